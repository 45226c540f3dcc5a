"""A bounded, validating safetensors reader: header checks first, then one tensor per read.

The `safetensors` package's numpy API cannot return bfloat16 and reports malformed files with
generic messages; this reader names the file and tensor and never allocates more than the file.
It reads checkpoints (the frontend) and artifacts' weight shards (the runtime), so it lives
with the artifact format, below both.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmc.errors import InputError

# Headers of real checkpoints are a few hundred KB; anything far larger is corrupt.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


@dataclass(frozen=True)
class TensorInfo:
    """What a source knows about a tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # source storage type, e.g. "float32", "bfloat16", "gguf:Q4_1"
    file: Path


class SafetensorsFile:
    """One `.safetensors` file, header parsed and validated on open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise InputError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise InputError(
                        f"{self.path}: corrupt safetensors header (claims {header_len} bytes, "
                        f"file has {size})"
                    )
                raw = handle.read(header_len)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read ({exc.strerror})") from None
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise InputError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise InputError(f"{self.path}: corrupt safetensors header (__metadata__ is not an "
                             "object)")
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, data_size)
        self._fd: int | None = None

    def _check_entry(self, name: str, entry: object, data_size: int):
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: header entry is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InputError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InputError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        numpy_name, itemsize = DTYPES[dtype]
        nbytes = int(np.prod(shape, dtype=object)) * itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise InputError(
                f"{where}: data_offsets {offsets} do not hold shape {shape} of {dtype}"
            )
        if end > data_size:
            raise InputError(
                f"{where}: data ends at byte {end} but the file holds {data_size} "
                "(truncated file?)"
            )
        return numpy_name, tuple(shape), begin, end

    def index(self) -> dict[str, TensorInfo]:
        return {
            name: TensorInfo(name, shape, dtype, self.path)
            for name, (dtype, shape, _, _) in self._entries.items()
        }

    def load(self, name: str) -> np.ndarray:
        """Read one tensor with pread into a fresh array (no mmap: a mapped checkpoint would
        count twice in RSS while its tensors are copied to the device)."""
        dtype, shape, begin, end = self._entries[name]
        storage = "<u2" if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<")
        array = np.empty(shape, dtype=storage)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(array.reshape(-1).view(np.uint8))
        offset, done = self._data_start + begin, 0
        while done < end - begin:
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count == 0:
                raise InputError(f"{self.path}: tensor {name!r} is truncated")
            done += count
        if dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(dtype, copy=False)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
