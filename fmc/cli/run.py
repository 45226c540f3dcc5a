"""`fmc run`: generate text from an artifact, streaming tokens as they are produced."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fmc.cli.output import emit_json, quiet_option, setup_logging, verify_option


def run_command(
    artifact: Path = typer.Argument(..., help="Artifact directory from `fmc compile`."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text (default: stdin)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest (0: all)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty",
                                             help="Penalise tokens already in the text (>1)."),
    context_window: int = typer.Option(None, "--context-window", help="KV-cache context."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    verify: bool = verify_option(),
    ignore_eos: bool = typer.Option(False, "--ignore-eos",
                                    help="Keep generating past end-of-sequence tokens."),
    stop: list[str] = typer.Option(
        None, "--stop", help="End the text before this string (repeatable); the string "
        "itself is not printed."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON result (text, token ids, timings, memory); "
        "no streaming."),
) -> None:
    """Generate a continuation of a prompt."""
    import time

    import fmc
    from fmc.errors import UsageError
    from fmc.runtime.memory import peak_resident_bytes, resident_bytes
    from fmc.runtime.sampling import SamplingParams

    setup_logging(quiet or json_out)
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("give a prompt with --prompt or on stdin")
        prompt = sys.stdin.read()
    sampling = SamplingParams(temperature, top_p, seed, top_k, repetition_penalty)
    import tvm  # noqa: F401  (imported before the baseline: TVM alone is ~400 MB resident)

    baseline = resident_bytes()
    engine = fmc.load(artifact, verify=verify, context_window=context_window, threads=threads)
    loaded = resident_bytes()
    tokenizer = engine.tokenizer
    tokenizer_bytes = None if loaded is None else resident_bytes() - loaded
    if json_out:
        start = time.perf_counter()
        prompt_ids = tokenizer.encode(prompt)
        rule = engine.stop_rule(max_tokens, stop_at_eos=not ignore_eos, stop=stop or ())
        steps = list(engine.steps(prompt_ids, rule, sampling, text=bool(stop)))
        ids = [step.token for step in steps if step.token is not None]
        text = "".join(step.text for step in steps) if stop else tokenizer.decode(ids)
        emit_json({"artifact": str(artifact), "prompt_tokens": len(prompt_ids),
                   "token_ids": ids, "text": text,
                   "finish_reason": steps[-1].finish_reason if steps else "length",
                   "seconds": time.perf_counter() - start,
                   "memory": _memory_report(engine, baseline, tokenizer_bytes,
                                            peak_resident_bytes())})
        return
    for piece in engine.stream(prompt, max_tokens, sampling, stop_at_eos=not ignore_eos,
                               stop=stop or ()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _memory_report(engine, baseline: int | None, tokenizer: int | None, peak: int) -> dict:
    """Measured peak resident memory of the model — above the process before loading (Python,
    TVM and fmc imported) and without the tokenizer's own tables, which the estimate does not
    model — next to the compiler's estimate scaled to this run's context window (and summed
    over the ranks of a tensor-parallel artifact run in one process)."""
    estimate = engine.manifest.memory
    kv = estimate.kv_cache_bytes * engine.context_window // estimate.context_window
    # per rank for a tensor-parallel artifact, whose ranks all live in this process
    expected = (estimate.weights_bytes + kv + estimate.workspace_bytes) * engine.ranks
    model = None if baseline is None else peak - baseline - tokenizer
    return {"baseline_rss_bytes": baseline, "tokenizer_rss_bytes": tokenizer,
            "peak_rss_bytes": peak, "model_peak_bytes": model, "estimate_bytes": expected,
            "context_window": engine.context_window}
