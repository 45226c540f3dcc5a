"""How commands talk to people and scripts: logs and progress on stderr, results on stdout."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def interactive() -> bool:
    """Rich progress only on a terminal and outside CI; plain lines otherwise."""
    return stderr.is_terminal and not os.environ.get("CI")


# `fmc --quiet COMMAND`: errors only, for every command (set by the app's callback).
GLOBAL_QUIET = {"on": False}


def quiet_option():
    """`--quiet` for a command (the same as the global `fmc --quiet`)."""
    import typer

    return typer.Option(False, "--quiet", help="Only errors on stderr.")


def cache_dir_option():
    """`--cache-dir` for commands that use the build cache."""
    import typer

    return typer.Option(None, "--cache-dir", help="Build cache directory (default: "
                        "FMC_CACHE_DIR, else ~/.cache/fmc).")


def no_cache_option():
    import typer

    return typer.Option(False, "--no-cache", help="Neither read nor write the build cache.")


def verify_option():
    """`--verify/--no-verify` for commands that load an artifact."""
    import typer

    return typer.Option(None, "--verify/--no-verify",
                        help="Hash every shard on load (default: artifacts up to 2 GiB).")


def is_quiet(local: bool = False) -> bool:
    """A command's own --quiet, or the global one."""
    return local or GLOBAL_QUIET["on"]


_INSTALLED: list[logging.Handler] = []  # the handler setup_logging added last


def setup_logging(quiet: bool = False, debug: bool = False) -> None:
    """Log "fmc" records to stderr for a command. Replaces only the handler it installed
    before (an embedding program's or a test's handlers stay), and filters on that handler so
    `--quiet` silences the terminal, not the other handlers."""
    quiet = is_quiet(quiet)
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO
    logger = logging.getLogger("fmc")
    while _INSTALLED:
        logger.removeHandler(_INSTALLED.pop())
    if interactive():
        handler: logging.Handler = RichHandler(console=stderr, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fmc: %(levelname)s: %(message)s"))
    handler.setLevel(level)
    logger.addHandler(handler)
    _INSTALLED.append(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def emit_json(data: Any) -> None:
    """The one JSON object a `--json` command prints on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def windowed_kv_note(windowed: tuple[int, tuple[int, ...]] | None, num_layers: int,
                     kv_cache_bytes: int, windowed_kv_cache_bytes: int | None,
                     context_window: int) -> str | None:
    """The memory line of a model with sliding-window layers: what a cache that dropped
    their old keys would hold, beside what fmc's cache holds."""
    if windowed is None or windowed_kv_cache_bytes is None:
        return None
    window, layers = windowed
    return (f"sliding window: {len(layers)} of {num_layers} layers attend to their last "
            f"{window} positions; keeping only those keys, the KV cache would be "
            f"{human_bytes(windowed_kv_cache_bytes)} for one {context_window}-token sequence; "
            f"fmc keeps every layer's keys ({human_bytes(kv_cache_bytes)}: TVM 0.27's paged "
            "cache has one page pool for all layers)")
