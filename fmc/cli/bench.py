"""`fmc bench`: prefill/decode throughput, time to first token and peak memory of an artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from fmc.cli.output import (
    emit_json,
    human_bytes,
    quiet_option,
    setup_logging,
    stdout,
    verify_option,
)


def bench_command(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens to prefill."),
    gen_len: int = typer.Option(64, "--gen-len", help="Tokens to decode."),
    runs: int = typer.Option(5, "--runs", help="Measured runs (median reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured runs first."),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together (aggregate "
                              "tokens/s)."),
    verify: bool = verify_option(),
    threads: int = typer.Option(
        None, "--threads", help="CPU threads (default: TVM_NUM_THREADS, else physical cores)."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
    profile: bool = typer.Option(
        False, "--profile", help="Also time every kernel of one prefill and the decode steps."),
    top: int = typer.Option(12, "--top", help="Kernels listed per table with --profile."),
) -> None:
    """Benchmark prefill and decode speed."""
    import fmc
    from fmc.runtime.bench import benchmark

    setup_logging(quiet or json_out)
    engine = fmc.load(artifact, verify=verify, threads=threads)
    used_threads = engine.threads
    result = benchmark(engine, prompt_len, gen_len, runs, warmup, batch=batch)
    result.update(threads=used_threads, artifact=str(artifact),
                  target=engine.manifest.target.name,
                  quantization=engine.manifest.quantization.default)
    if profile:
        from fmc.runtime.profile import profile_kernels

        result["profile"] = profile_kernels(engine, prompt_len, gen_len)
    if json_out:
        emit_json(result)
        return
    p, d = result["prefill_tokens_per_s"], result["decode_tokens_per_s"]
    batched = f", batch {batch}: aggregate tok/s" if batch > 1 else ""
    stdout.print(f"{artifact} ({result['target']}, {result['quantization']}, "
                 f"{used_threads} threads; median of {runs} after {warmup} warm-up{batched})")
    stdout.print(f"  prefill {prompt_len} tokens: {p['median']:.1f} tok/s "
                 f"[{p['min']:.1f}–{p['max']:.1f}]")
    stdout.print(f"  decode {gen_len} tokens:  {d['median']:.1f} tok/s "
                 f"[{d['min']:.1f}–{d['max']:.1f}]")
    if batch == 1:
        ttft = result["time_to_first_token_s"]["median"]
        stdout.print(f"  time to first token: {ttft * 1000:.1f} ms")
    stdout.print(f"  peak RSS: {human_bytes(result['peak_rss_bytes'])}")
    if profile:
        for phase in ("prefill", "decode"):
            _print_profile(phase, result["profile"][phase], top)


def _print_profile(phase: str, table: dict, top: int) -> None:
    from rich.table import Table

    title = (f"{phase}: {table['step_ms']:.2f} ms per step, kernels and VM builtins "
             f"{table['kernels_ms']:.2f} ms (timing hook included)")
    view = Table(title=title, title_justify="left", box=None)
    for column in ("kernel", "calls", "ms/step", "µs/call", "share"):
        view.add_column(column, justify="left" if column == "kernel" else "right",
                        overflow="fold")
    for row in table["kernels"][:top]:
        view.add_row(row["kernel"], f"{row['calls_per_step']:g}", f"{row['ms_per_step']:.3f}",
                     f"{row['us_per_call']:.1f}", f"{row['share']:.0%}")
    stdout.print(view)
