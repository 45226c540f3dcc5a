"""`fmc serve`: an OpenAI-compatible HTTP server over one or more artifacts."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import typer

from fmc.cli.output import quiet_option, setup_logging, verify_option


def _print_ready(info: dict) -> None:
    """One line, so a script can read it as soon as the server listens."""
    sys.stdout.write(json.dumps(info, sort_keys=True) + "\n")
    sys.stdout.flush()


def serve_command(
    artifacts: list[Path] = typer.Argument(..., help="Artifact directories from `fmc compile`; "
                                           "each is one model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (localhost by "
                             "default; 0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free one; see --json)."),
    name: list[str] = typer.Option(None, "--name", help="Model name for the API, one per "
                                   "artifact in order (default: the directory's name)."),
    api_key: str = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY` "
                                "on /v1/* and /metrics (default: $FMC_API_KEY, else none)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for admission "
                                  "before the server answers 429."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together (a "
                                  "request with n choices takes n)."),
    prefill_budget: int = typer.Option(None, "--prefill-budget", help="Prompt tokens "
                                       "prefilled per engine step, between decode steps "
                                       "(default and maximum: the artifact's prefill chunk)."),
    busy_prefill_budget: int = typer.Option(None, "--busy-prefill-budget", help="Prompt "
                                            "tokens an engine step packs while streams are "
                                            "decoding, beyond its first prompt or chunk "
                                            "(default 128, at most --prefill-budget; smaller: "
                                            "shorter pauses, later first tokens)."),
    prefix_cache_pages: int = typer.Option(None, "--prefix-cache-pages", help="KV pages "
                                           "kept by finished sequences for prefix reuse "
                                           "(default: half the cache; 0: keep none)."),
    grace: float = typer.Option(10.0, "--grace", help="Seconds SIGTERM waits for in-flight "
                                "requests before cancelling them."),
    context_window: int = typer.Option(None, "--context-window", help="KV-cache context."),
    threads: int = typer.Option(None, "--threads", help="CPU threads."),
    verify: bool = verify_option(),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON line when the server "
                                  "listens (URL, bound port, models); logs warnings only."),
) -> None:
    """Serve artifacts over OpenAI's HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /metrics) with continuous batching. See docs/serve.md."""
    from fmc.errors import UsageError

    try:
        from fmc.serve import serve
    except ImportError as exc:
        raise UsageError(f"fmc serve needs the server packages ({exc.name} is missing): "
                         "pip install 'fmc[serve]'") from None
    if max_batch < 1 or max_queue < 0 or any(
            budget is not None and budget < 1 for budget in (prefill_budget,
                                                             busy_prefill_budget)) \
            or (prefix_cache_pages is not None and prefix_cache_pages < 0):
        raise UsageError("--max-batch, --prefill-budget and --busy-prefill-budget must be "
                         "≥ 1, --max-queue and --prefix-cache-pages ≥ 0")
    setup_logging(quiet or json_out)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal
    # to the previous handler: make that a no-op so a requested shutdown exits 0.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
    serve(artifacts, name or None, host=host, port=port, api_key=api_key,
          max_queue=max_queue, max_batch=max_batch, prefill_budget=prefill_budget,
          prefix_pages=prefix_cache_pages, busy_prefill_budget=busy_prefill_budget,
          grace=grace, log_level="warning" if quiet or json_out else "info",
          on_ready=_print_ready if json_out else None,
          verify=verify, context_window=context_window, threads=threads)
