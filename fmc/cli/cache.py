"""`fmc cache ls|clean`: the build cache's entries (libraries, converted weights)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer
from rich.table import Table

from fmc.cli.output import (
    cache_dir_option,
    emit_json,
    human_bytes,
    quiet_option,
    setup_logging,
    stdout,
)
from fmc.errors import UsageError

app = typer.Typer(help="The build cache (libraries and converted weights).",
                  no_args_is_help=True)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise UsageError(f"--older-than {text!r}: expected a number and a unit s, m, h, d or "
                         "w (e.g. 30d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _open(cache_dir: Path | None):
    from fmc.artifacts.cache import BuildCache
    from fmc.paths import cache_dir as default_dir

    return BuildCache(cache_dir or default_dir())


CACHE_DIR = cache_dir_option()
KIND = typer.Option(None, "--kind", help="Only this kind: library or weights.")


def _check_kind(kind: str | None) -> None:
    from fmc.artifacts.cache import KINDS
    from fmc.errors import unknown_choice

    if kind is not None and kind not in KINDS:
        raise unknown_choice("cache entry kind", kind, list(KINDS))


@app.command("ls")
def ls_command(cache_dir: Path = CACHE_DIR, kind: str = KIND,
               quiet: bool = quiet_option(),
               json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")):
    """List cache entries, least recently used first: kind, key, size, last use, label."""
    setup_logging(quiet or json_out)
    _check_kind(kind)
    cache = _open(cache_dir)
    rows = sorted((r for r in cache.entries() if kind in (None, r["kind"])),
                  key=lambda r: r["last_used"])
    total = sum(r["bytes"] for r in rows)
    if json_out:
        emit_json({"cache_dir": str(cache.root), "entries": rows, "total_bytes": total})
        return
    table = Table(title=f"{cache.root}: {len(rows)} entries, {human_bytes(total)}")
    for column in ("kind", "key", "size", "last used", "made from"):
        table.add_column(column)
    now = time.time()
    for row in rows:
        table.add_row(row["kind"], row["key"][:16], human_bytes(row["bytes"]),
                      f"{(now - row['last_used']) / 3600:.1f} h ago", row["label"] or "")
    stdout.print(table)


@app.command("clean")
def clean_command(
    cache_dir: Path = CACHE_DIR, kind: str = KIND,
    older_than: str = typer.Option(None, "--older-than",
                                   help="Only entries unused for this long (30d, 12h, …)."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Remove cache entries (all, or those unused for --older-than), and leftovers of
    interrupted writers."""
    setup_logging(quiet or json_out)
    _check_kind(kind)
    age = parse_duration(older_than) if older_than is not None else None
    cache = _open(cache_dir)
    result = cache.clean(age, kind)
    if json_out:
        emit_json({"cache_dir": str(cache.root), **result})
        return
    stdout.print(f"removed {result['removed']} entries, freed "
                 f"{human_bytes(result['freed_bytes'])} from {cache.root}")
