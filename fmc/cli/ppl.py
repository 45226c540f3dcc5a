"""`fmc ppl`: perplexity of an artifact on a text file (llama.cpp's windowed protocol)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout, verify_option

log = logging.getLogger("fmc")


def ppl_command(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    context: int = typer.Option(512, "--context", "-c", help="Window length in tokens."),
    max_chunks: int = typer.Option(None, "--max-chunks", help="Score at most this many."),
    kl_base: Path = typer.Option(
        None, "--kl-base", help="Artifact of the unquantized model: also report the KL "
        "divergence from its distributions and the same-top-token rate."),
    verify: bool = verify_option(),
    threads: int = typer.Option(None, "--threads", help="CPU threads."),
    decode: bool = typer.Option(
        False, "--decode",
        help="Score each position from a decode step (the kernels generation runs) instead "
             "of one prefill per window; slower."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
) -> None:
    """Perplexity with non-overlapping windows, the second half of each scored."""
    import fmc
    from fmc.errors import InputError
    from fmc.runtime.perplexity import perplexity

    setup_logging(quiet or json_out)
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{text}: cannot read as UTF-8 text ({exc})") from None
    engine = fmc.load(artifact, verify=verify, threads=threads, context_window=max(context, 1))
    tokens = engine.tokenizer.encode(content)
    base = None
    if kl_base is not None:
        base = fmc.load(kl_base, verify=verify, threads=threads,
                        context_window=max(context, 1))
        if base.config.vocab_size != engine.config.vocab_size:
            raise InputError(f"{kl_base}: --kl-base has a different vocabulary than "
                             f"{artifact}")

    def report(done, total, value):
        log.info("chunk %d/%d: running perplexity %.4f", done, total, value)

    result = perplexity(engine, tokens, context, max_chunks, progress=report, base=base,
                        decode=decode)
    result.update(artifact=str(artifact), text=str(text),
                  quantization=engine.manifest.quantization.default)
    if json_out:
        emit_json(result)
    else:
        stdout.print(f"perplexity {result['perplexity']:.4f} over {result['scored_tokens']} "
                     f"scored tokens ({result['chunks']} windows of {context}; "
                     f"{result['seconds']:.1f} s)")
        if base is not None:
            stdout.print(f"KL divergence from {kl_base}: {result['kl_divergence']:.6f} ± "
                         f"{result['kl_divergence_stderr']:.6f} nats; same top token "
                         f"{100 * result['same_top_token']:.2f} %; base perplexity "
                         f"{result['base_perplexity']:.4f}")
