"""A content-addressed store for build products (libraries, converted weight shards).

An entry is a directory `ROOT/v1/KIND/KEY/` holding `files/…` and `entry.json` (the key's
record, a label, every file's sha256 and size, and the producer's metadata). Entries are
written in a temporary directory and renamed into place, so readers never see half an entry;
restoring copies each file while hashing it and treats a mismatch as a miss (the entry is
dropped). The cache is an accelerator: failing to write it is a warning, never an error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmc.artifacts.staging import pid_alive
from fmc.paths import write_memo

log = logging.getLogger("fmc")

LAYOUT = "v1"
ENTRY = "entry.json"
FILES = "files"
KINDS = ("library", "weights")
# A file modified this recently may change again within its mtime's resolution: hash it,
# but do not remember the digest (as ccache does for "too new" files).
DIGEST_MEMO_MIN_AGE_S = 2.0
COPY_CHUNK = 1 << 22


def record_key(record: dict[str, Any]) -> str:
    """The cache key of a JSON-able record: sha256 of its canonical JSON."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Entry:
    kind: str
    key: str
    path: Path
    info: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.info["meta"]


def _copy_hashing(source: Path, destination: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while block := reader.read(COPY_CHUNK):
            digest.update(block)
            writer.write(block)
    return digest.hexdigest()


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class BuildCache:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.base = self.root / LAYOUT

    # -- lookup and restore -----------------------------------------------------------------
    def _entry_dir(self, kind: str, key: str) -> Path:
        return self.base / kind / key

    def lookup(self, kind: str, key: str) -> Entry | None:
        directory = self._entry_dir(kind, key)
        try:
            info = json.loads((directory / ENTRY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Entry(kind, key, directory, info)

    def restore(self, entry: Entry, destination: Path) -> bool:
        """Copy the entry's files under `destination`, checking every sha256; on a mismatch
        or a missing file the entry is removed and False returned (the caller rebuilds)."""
        copied: list[Path] = []
        for relative, expected in entry.info["files"].items():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                digest = _copy_hashing(entry.path / FILES / relative, target)
            except FileNotFoundError:
                digest = None
            copied.append(target)
            if digest != expected["sha256"]:
                log.warning("build cache entry %s/%s is damaged (%s); rebuilding it",
                            entry.kind, entry.key[:16], relative)
                for path in copied:
                    path.unlink(missing_ok=True)
                shutil.rmtree(entry.path, ignore_errors=True)
                return False
        try:
            os.utime(entry.path / ENTRY)  # last use, for `fmc cache clean --older-than`
        except OSError:
            pass
        return True

    # -- store -------------------------------------------------------------------------------
    def store(self, kind: str, key: str, record: dict[str, Any], label: str,
              files: dict[str, Path], meta: dict[str, Any]) -> None:
        """Add an entry (no-op if another process stored the same key first)."""
        final = self._entry_dir(kind, key)
        if (final / ENTRY).is_file():
            return
        self._remove_dead_writers()
        temp = self.base / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            listed = {}
            for relative, source in sorted(files.items()):
                target = temp / FILES / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                listed[relative] = {"sha256": _copy_hashing(source, target),
                                    "bytes": target.stat().st_size}
            info = {"kind": kind, "key": key, "label": label, "created": time.time(),
                    "record": record, "files": listed, "meta": meta}
            (temp / ENTRY).write_text(json.dumps(info, sort_keys=True), encoding="utf-8")
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(temp, final)
            except OSError:
                if not (final / ENTRY).is_file():  # not a concurrent store of the same key
                    raise
        except OSError as exc:
            log.warning("could not write the build cache at %s (%s); continuing without it",
                        self.root, exc.strerror or exc)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def _remove_dead_writers(self) -> int:
        """Remove temporary entries of processes that died while writing; bytes freed."""
        freed = 0
        for temp in (self.base / "tmp").glob("*"):
            pid = temp.name.split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                freed += _tree_bytes(temp)
                shutil.rmtree(temp, ignore_errors=True)
        return freed

    # -- file digests ------------------------------------------------------------------------
    def file_digest(self, path: Path) -> str:
        """sha256 of a file's content, remembered by (path, size, mtime, inode) so an
        unchanged multi-gigabyte checkpoint is hashed once."""
        path = Path(path).resolve()
        stat = path.stat()
        identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        memo = self.base / "digests" / hashlib.sha256(str(path).encode()).hexdigest()
        try:
            remembered = json.loads(memo.read_text(encoding="utf-8"))
            if remembered["identity"] == identity:
                return remembered["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(COPY_CHUNK):
                digest.update(block)
        value = digest.hexdigest()
        if time.time() - stat.st_mtime_ns / 1e9 >= DIGEST_MEMO_MIN_AGE_S:
            write_memo(memo, {"identity": identity, "sha256": value, "path": str(path)})
        return value

    # -- listing and cleaning ----------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        rows = []
        for kind in KINDS:
            for directory in sorted((self.base / kind).glob("*")):
                entry = self.lookup(kind, directory.name)
                if entry is None:
                    continue
                rows.append({"kind": kind, "key": entry.key, "label": entry.info.get("label"),
                             "bytes": _tree_bytes(directory),
                             "created": entry.info.get("created"),
                             "last_used": (directory / ENTRY).stat().st_mtime,
                             "path": str(directory)})
        return rows

    def clean(self, older_than_s: float | None = None,
              kind: str | None = None) -> dict[str, int]:
        """Remove entries (all, or those unused for `older_than_s` seconds, of one kind or
        both), leftovers of killed writers, and remembered digests of vanished files."""
        now = time.time()
        removed = freed = 0
        for row in self.entries():
            if kind is not None and row["kind"] != kind:
                continue
            if older_than_s is not None and now - row["last_used"] < older_than_s:
                continue
            shutil.rmtree(row["path"], ignore_errors=True)
            removed += 1
            freed += row["bytes"]
        freed += self._remove_dead_writers()
        for memo in (self.base / "digests").glob("*"):
            try:
                if not Path(json.loads(memo.read_text(encoding="utf-8"))["path"]).exists():
                    memo.unlink()
            except (OSError, ValueError, KeyError, TypeError):
                memo.unlink(missing_ok=True)
        return {"removed": removed, "freed_bytes": freed}
