"""`fmc bench`: prefill/decode throughput, time to first token and peak memory of an artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from fmc.cli.output import emit_json, human_bytes, setup_logging, stdout


def bench_command(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens to prefill."),
    gen_len: int = typer.Option(64, "--gen-len", help="Tokens to decode."),
    runs: int = typer.Option(5, "--runs", help="Measured runs (median reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured runs first."),
    threads: int = typer.Option(
        None, "--threads", help="CPU threads (default: TVM_NUM_THREADS, else physical cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
) -> None:
    """Benchmark prefill and decode speed."""
    import fmc
    from fmc.runtime.bench import benchmark

    setup_logging(quiet=json_out)
    engine = fmc.load(artifact, threads=threads)
    used_threads = engine.threads
    result = benchmark(engine, prompt_len, gen_len, runs, warmup)
    result.update(threads=used_threads, artifact=str(artifact),
                  target=engine.manifest["target"]["name"],
                  quantization=engine.manifest["quantization"]["default"])
    if json_out:
        emit_json(result)
        return
    p, d, t = (result[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                   "time_to_first_token_s"))
    stdout.print(f"{artifact} ({result['target']}, {result['quantization']}, "
                 f"{used_threads} threads; median of {runs} after {warmup} warm-up)")
    stdout.print(f"  prefill {prompt_len} tokens: {p['median']:.1f} tok/s "
                 f"[{p['min']:.1f}–{p['max']:.1f}]")
    stdout.print(f"  decode {gen_len} tokens:  {d['median']:.1f} tok/s "
                 f"[{d['min']:.1f}–{d['max']:.1f}]")
    stdout.print(f"  time to first token: {t['median'] * 1000:.1f} ms")
    stdout.print(f"  peak RSS: {human_bytes(result['peak_rss_bytes'])}")
