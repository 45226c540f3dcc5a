"""`fmc compile`: a model (directory, GGUF, hub id or preset) → an artifact directory."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from fmc.cli.output import (
    cache_dir_option,
    emit_json,
    human_bytes,
    is_quiet,
    no_cache_option,
    quiet_option,
    setup_logging,
    stderr,
    stdout,
    windowed_kv_note,
)


def compile_command(**values) -> None:
    """Compile a model into an artifact: library + weight shards + tokenizer + manifest."""
    from fmc.artifacts.manifest import MANIFEST
    from fmc.cli.progress import CompileProgress
    from fmc.compiler import compile_model, plan_compile

    dry_run, depfile, json_out = (values.pop(k) for k in ("dry_run", "depfile", "json_out"))
    no_cache, cache_dir, quiet = (values.pop(k) for k in ("no_cache", "cache_dir", "quiet"))
    quiet = is_quiet(quiet)
    setup_logging(quiet or json_out)
    options = options_from_cli(values, use_cache=False if no_cache else None,
                               cache_dir=cache_dir)
    if dry_run:
        _print_plan(plan_compile(options), json_out)
        return
    with CompileProgress(quiet or json_out) as progress:
        result = compile_model(options, progress)
    output = Path(options.output)
    if depfile is not None:
        from fmc.artifacts import depfile as depfiles

        depfiles.write(depfile, str(output / MANIFEST), result.input_files)
    manifest = result.manifest
    if json_out:
        emit_json({"output": str(result.output), "timings": result.timings,
                   "target": manifest.target.name,
                   "quantization": manifest.quantization.default,
                   "library": manifest.library.to_dict(), "memory": manifest.memory.to_dict(),
                   "weights": manifest.weights.present, "cache": result.cache})
    elif not quiet:
        total = sum(result.timings.values())
        hits = [step for step, status in result.cache.items() if status == "hit"]
        cached = f" (cached: {', '.join(hits)})" if hits else ""
        stderr.print(f"[bold green]compiled[/] {result.output} in {total:.1f} s{cached}")


def _cli_parameters() -> list[inspect.Parameter]:
    """fmc compile's arguments: one per CompileOptions field that has flags (its default,
    help and flags from the field's metadata), then the command's own."""
    from fmc.options import described

    parameters = []
    for item, meta in described():
        if meta.flags is None:
            continue
        kind = value_type(item, meta)
        if meta.argument:
            default = typer.Argument(None, help=meta.help)
        else:
            # A parsed option's default is the field's, shown as text; lists start empty.
            initial = None if meta.parse is not None else [] if kind is list[str] \
                else ... if meta.required else default_of(item)
            shown = f" Default: {meta.show(default_of(item))}." if meta.show else ""
            default = typer.Option(initial, *meta.flags, help=meta.help + shown)
        parameters.append(inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=default, annotation=kind))
    own = {
        "dry_run": (bool, typer.Option(False, "--dry-run", help="Print the plan and a memory "
                                       "estimate; compile nothing.")),
        "depfile": (Path, typer.Option(None, "--depfile", help="Also write a Make dependency "
                                       "file: OUTPUT/manifest.json depends on every input "
                                       "file.")),
        "cache_dir": (Path, cache_dir_option()),
        "no_cache": (bool, no_cache_option()),
        "json_out": (bool, typer.Option(False, "--json", help="Print one JSON result on "
                                        "stdout.")),
        "quiet": (bool, quiet_option()),
    }
    for name, (kind, default) in own.items():
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=default, annotation=kind))
    return parameters


def value_type(item, meta) -> type:
    """What the command line gives for a field: text for a parsed one, else the field's."""
    kind = str(item.type)
    if meta.parse is None and kind.startswith("list"):
        return list[str]
    if meta.parse is None and kind.startswith("bool"):
        return bool
    if meta.parse is None and kind.startswith("int"):
        return int
    return str


def default_of(item):
    import dataclasses

    return item.default_factory() if item.default_factory is not dataclasses.MISSING \
        else item.default


def options_from_cli(values: dict, **extra):
    """CompileOptions from the command line's values (a parsed option given as text is
    parsed; an absent one keeps the field's default)."""
    from fmc.options import CompileOptions, described

    settings = {}
    for item, meta in described():
        if item.name not in values:
            continue
        value = values[item.name]
        if meta.parse is not None:
            if value is None:
                continue
            value = meta.parse(value)
        settings[item.name] = list(value) if isinstance(value, (list, tuple)) else value
    return CompileOptions(**settings, **extra)


compile_command.__signature__ = inspect.Signature(_cli_parameters())


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
    counts = plan["parameter_count"]
    if memory.get("active_weights_bytes") is not None:
        stdout.print(f"mixture of experts: {counts['active'] / 1e9:.2f} B of "
                     f"{counts['total'] / 1e9:.2f} B parameters active per token; a token "
                     f"reads {human_bytes(memory['active_weights_bytes'])} of the weights",
                     highlight=False)
    from fmc.model_config import ModelConfig

    architecture = ModelConfig.from_dict(model["architecture"])
    note = windowed_kv_note(architecture.windowed_layers, architecture.num_hidden_layers,
                            memory["kv_cache_bytes"], memory.get("windowed_kv_cache_bytes"),
                            memory["context_window"])
    if note:
        stdout.print(note, highlight=False)
    for scheme, size in sorted(memory["weights_bytes_per_scheme"].items()):
        stdout.print(f"  {scheme}: {human_bytes(size)}", highlight=False)
    cache = plan["cache"]
    stdout.print(f"build cache: library {cache['library']}, weights {cache['weights']} "
                 f"({cache['dir']})" if cache else "build cache: off", highlight=False)
