"""Build an output directory beside its final path and rename it into place only when complete.

A failed or interrupted compile leaves the output path untouched: either the previous
complete artifact or nothing. Leftovers of killed processes are removed by the next run."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from fmc.artifacts.lock import file_lock
from fmc.errors import OutputError

TMP_MARKER = ".fmc-tmp-"
OLD_MARKER = ".fmc-old-"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(output: Path) -> None:
    """Remove temporary siblings of `output` left by processes that no longer run."""
    parent = output.parent
    if not parent.is_dir():
        return
    for marker in (TMP_MARKER, OLD_MARKER):
        for entry in parent.glob(f".{output.name}{marker}*"):
            pid_text = entry.name.rsplit(marker, 1)[1].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)


class StagingDir:
    """`with StagingDir(out, force) as tmp: ... ; tmp.commit()` — commit is the only way
    anything appears at `out`."""

    def __init__(self, output: Path, force: bool = False):
        self.output = Path(output)
        self.force = force
        self.path: Path | None = None
        self.committed = False

    def __enter__(self) -> StagingDir:
        parent = self.output.parent
        if self.output.exists() and not self.force:
            raise OutputError(f"{self.output}: already exists (pass --force to replace it)")
        if self.output.exists() and not self.output.is_dir():
            raise OutputError(f"{self.output}: exists and is not a directory")
        blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputError(f"{blocker}: is a file, so {self.output} cannot be created "
                              "under it")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create output directory ({exc.strerror})") \
                from None
        clean_stale(self.output)
        name = f".{self.output.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = parent / name
        try:
            self.path.mkdir()
        except OSError as exc:
            raise OutputError(f"{parent}: not writable ({exc.strerror})") from None
        return self

    def commit(self) -> None:
        """Atomically publish the staged directory (replacing an old artifact with --force).
        The parent directory is locked meanwhile: two processes publishing the same path
        take turns, and the last one wins."""
        assert self.path is not None
        with file_lock(self.output.parent):
            self._publish()
        self.committed = True

    def _publish(self) -> None:
        if self.output.exists() and not self.force:
            raise OutputError(f"{self.output}: already exists (pass --force to replace it)")
        old = None
        if self.output.exists():
            old = self.output.parent / (f".{self.output.name}{OLD_MARKER}{os.getpid()}-"
                                        f"{uuid.uuid4().hex[:8]}")
            os.rename(self.output, old)
        try:
            os.rename(self.path, self.output)
        except OSError:
            if old is not None:
                os.rename(old, self.output)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{self.output}: no space left on device while writing the "
                              "artifact (nothing was written)") from None
