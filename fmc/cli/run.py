"""`fmc run`: generate text from an artifact, streaming tokens as they are produced."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fmc.cli.output import emit_json, setup_logging


def run_command(
    artifact: Path = typer.Argument(..., help="Artifact directory from `fmc compile`."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text (default: stdin)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    context_window: int = typer.Option(None, "--context-window", help="KV-cache context."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    verify: bool = typer.Option(None, "--verify/--no-verify",
                                help="Hash the shards on load (default: small artifacts)."),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON result (text, token ids, timings); no streaming."),
) -> None:
    """Generate a continuation of a prompt."""
    import time

    import fmc
    from fmc.errors import UsageError
    from fmc.runtime.sampling import SamplingParams

    setup_logging(quiet=json_out)
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("give a prompt with --prompt or on stdin")
        prompt = sys.stdin.read()
    sampling = SamplingParams(temperature, top_p, seed)
    engine = fmc.load(artifact, verify=verify, context_window=context_window, threads=threads)
    if json_out:
        start = time.perf_counter()
        prompt_ids = engine.tokenizer.encode(prompt)
        ids = list(engine.generate_ids(prompt_ids, max_tokens, sampling))
        emit_json({"artifact": str(artifact), "prompt_tokens": len(prompt_ids),
                   "token_ids": ids, "text": engine.tokenizer.decode(ids),
                   "seconds": time.perf_counter() - start})
        return
    for piece in engine.stream(prompt, max_tokens, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
