"""`fmc chat`: an interactive conversation with the model's chat template, streamed."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fmc.cli.output import emit_json, quiet_option, setup_logging, stderr, verify_option


def chat_command(
    artifact: Path = typer.Argument(..., help="Artifact directory from `fmc compile`."),
    session: Path = typer.Option(None, "--session",
                                 help="Resume from this session file if it exists; save the "
                                 "conversation to it on exit."),
    system: str = typer.Option(None, "--system", help="System prompt (new conversations)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest (0: all)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty",
                                             help="Penalise tokens already said (>1)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    context_window: int = typer.Option(None, "--context-window", help="KV-cache context."),
    threads: int = typer.Option(None, "--threads", help="CPU threads."),
    verify: bool = verify_option(),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="No streaming; print one JSON object "
                                  "with every turn at the end."),
) -> None:
    """Chat: one user message per line on stdin, the reply streamed to stdout. Ctrl-C stops
    the current reply; end of input (Ctrl-D) ends the conversation (saved with --session)."""
    import fmc
    from fmc.runtime.chat import Conversation
    from fmc.runtime.sampling import SamplingParams

    setup_logging(quiet or json_out)
    sampling = SamplingParams(temperature, top_p, seed, top_k, repetition_penalty)
    engine = fmc.load(artifact, verify=verify, context_window=context_window, threads=threads)
    if session is not None and session.exists():
        conversation = Conversation.resume(engine, session, sampling)
        if not (quiet or json_out):
            stderr.print(f"resumed {session}: {len(conversation.messages)} messages, "
                         f"{len(engine.history[conversation.seq])} tokens cached")
    else:
        conversation = Conversation(engine, system, sampling)
    interactive = sys.stdin.isatty() and not json_out
    turns = []
    while True:
        if interactive:
            stderr.print("[bold]>[/] ", end="")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt: end the conversation (and save it)
            break
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        pieces = []
        try:
            for piece in conversation.reply(text, max_tokens):
                pieces.append(piece)
                if not json_out:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.append("")  # the reply stops here; the conversation goes on
            if not json_out:
                sys.stdout.write(" [stopped]")
        if not json_out:
            sys.stdout.write("\n")
            sys.stdout.flush()
        turns.append({"user": text, "assistant": "".join(pieces),
                      "prefilled_tokens": conversation.prefilled})
    if session is not None:
        conversation.save(session)
    if json_out:
        emit_json({"artifact": str(artifact), "turns": turns,
                   "cached_tokens": len(engine.history[conversation.seq]),
                   "session": str(session) if session else None})
