"""Where fmc keeps files between runs."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """`FMC_CACHE_DIR`, else `$XDG_CACHE_HOME/fmc`, else `~/.cache/fmc`."""
    base = os.environ.get("FMC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fmc")
    return Path(base)


def write_memo(path: Path, content: dict) -> None:
    """Best effort: `content` as JSON, renamed into place (a reader never sees half of it);
    a memo that cannot be written only costs the next run the work it would have saved."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(content), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
