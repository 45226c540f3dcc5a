"""Process memory as the OS sees it: resident bytes now and at peak, for `fmc run --json`
to check the compiler's memory estimate against."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def resident_bytes() -> int | None:
    """Resident set size now (Linux), or None where the OS does not say."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The process's peak resident set size so far."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB else


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them after the weights' staging
    arrays are freed: ~45 MB on a 540 MB artifact); a no-op where there is no malloc_trim."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return
    if trim is not None:
        trim(0)
