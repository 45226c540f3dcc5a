"""Where fmc keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`FMC_CACHE_DIR`, else `$XDG_CACHE_HOME/fmc`, else `~/.cache/fmc`."""
    base = os.environ.get("FMC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fmc")
    return Path(base)
