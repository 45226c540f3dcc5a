"""Make-format dependency files: the artifact's manifest depends on every input file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from fmc.errors import OutputError


def _escape(path: str) -> str:
    """Escape a path for a Make rule (as GCC's -MD does for spaces, `#` and `$`)."""
    return path.replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")


def render(target: str, inputs: Iterable[Path]) -> str:
    """`target: inputs…` plus an empty rule per input (GCC's -MP), so a deleted input makes
    Make rebuild instead of failing."""
    deps = sorted({str(Path(p).resolve()) for p in inputs})
    lines = [f"{_escape(target)}:" + "".join(f" \\\n  {_escape(d)}" for d in deps), ""]
    lines += [f"{_escape(d)}:\n" for d in deps]
    return "\n".join(lines)


def write(path: Path | str, target: str, inputs: Iterable[Path]) -> None:
    """Write atomically (a temp file renamed into place): Make never reads half a depfile."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.fmc-tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(render(target, inputs), encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the depfile ({exc.strerror})") from None
