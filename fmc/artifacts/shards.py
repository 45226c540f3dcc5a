"""Write weights as size-capped safetensors shards, hashing every tensor and shard."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fmc.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

SHARD_DIR = "params"
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024


def parse_size(text: str) -> int:
    """A shard size as written on the command line or in fmc.toml: '512MB', '1GiB',
    '1048576' → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        if unit not in units:
            raise ValueError
        return int(float(number) * units[unit])
    except ValueError:
        raise UsageError(f"cannot parse size {text!r} (e.g. 512MB, 1GiB)") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' writer, imported on first use (it imports numpy)."""
    from safetensors.numpy import save_file as write

    write(tensors, path, metadata=metadata)


def sha256_array(array: np.ndarray) -> str:
    import numpy as np  # lazy: the option parsing that imports this module needs no numpy

    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


class ShardWriter:
    """Accumulates tensors up to `max_bytes`, then writes one shard; memory stays bounded by
    one shard plus one tensor."""

    def __init__(self, artifact_dir: Path, max_bytes: int = DEFAULT_SHARD_BYTES,
                 subdir: str | None = None):
        # tensor-parallel artifacts keep each rank's shards in params/rank-R/
        self.prefix = f"{SHARD_DIR}/{subdir}" if subdir else SHARD_DIR
        self.directory = artifact_dir / self.prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        self.artifact_dir = artifact_dir
        self.max_bytes = max_bytes
        self.tensors: list[dict] = []
        self.shards: list[dict] = []
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0

    def _shard_name(self) -> str:
        return f"{self.prefix}/shard-{len(self.shards):05d}.safetensors"

    def add(self, name: str, array: np.ndarray) -> None:
        import numpy as np

        array = np.ascontiguousarray(array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.tensors.append({"name": name, "shape": list(array.shape), "dtype": str(array.dtype),
                             "shard": self._shard_name(), "bytes": int(array.nbytes),
                             "sha256": sha256_array(array)})

    def _flush(self) -> None:
        if not self._pending:
            return
        relative = self._shard_name()
        path = self.artifact_dir / relative
        save_file(self._pending, str(path), metadata={"format": "fmc"})
        # safetensors writes 0600; shards are read by whoever runs the artifact, like the
        # library and the manifest beside them.
        path.chmod(0o666 & ~_umask())
        self.shards.append({"file": relative, "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> tuple[list[dict], list[dict]]:
        """Write the last shard; returns (tensor entries, shard entries)."""
        self._flush()
        return self.tensors, self.shards
