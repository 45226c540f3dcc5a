"""Checkpoint tensors that stack several layers by rows, split on load.

A family's `Architecture.fused_weights` names them (phi3: `qkv_proj` → q/k/v_proj,
`gate_up_proj` → gate/up_proj). The wrapper presents every part as a tensor of its own, so
the model, the quantizers, tensor parallelism and the calibration see llama-style layers;
horizontal fusion (fmc/lowering/passes/fuse_horizontal.py) concatenates them again into
one matmul, so splitting costs no kernel. GGUF blocks are split by whole rows too, so a
quantized fused tensor still imports without loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fmc.errors import InputError
from fmc.frontend.weights import TensorInfo


class SplitFusedWeights:
    """`source` with each fused tensor replaced by its parts (same dtype, fewer rows)."""

    def __init__(self, source, fused_weights, config):
        self.source = source
        # part name → (fused tensor name, first row, end row)
        self._parts: dict[str, tuple[str, int, int]] = {}
        self._index: dict[str, TensorInfo] = {}
        for name, info in source.index().items():
            split = _split_of(name, fused_weights)
            if split is None:
                self._index[name] = info
                continue
            prefix, suffix, fused = split
            rows = tuple(int(r) for r in fused.rows(config))
            if not info.shape or info.shape[0] != sum(rows):
                parts = " + ".join(f"{part.rsplit('.', 1)[-1]} {count}"
                                   for part, count in zip(fused.parts, rows, strict=True))
                raise InputError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}; "
                                 f"the config makes {fused.fused} {sum(rows)} rows ({parts})")
            start = 0
            for part, count in zip(fused.parts, rows, strict=True):
                part_name = f"{prefix}{part}{suffix}"
                self._parts[part_name] = (name, start, start + count)
                self._index[part_name] = dataclasses.replace(
                    info, name=part_name, shape=(count, *info.shape[1:]))
                start += count
        if hasattr(source, "raw"):
            self.raw = self._raw
        self._cached: tuple[str, np.ndarray] | None = None

    def index(self) -> dict[str, TensorInfo]:
        return dict(self._index)

    def load(self, name: str) -> np.ndarray:
        if name not in self._parts:
            return self.source.load(name)
        fused, start, end = self._parts[name]
        # The parts of one tensor are read one after another: keep the last fused tensor.
        if self._cached is None or self._cached[0] != fused:
            self._cached = (fused, self.source.load(fused))
        return np.ascontiguousarray(self._cached[1][start:end])

    def _raw(self, name: str) -> tuple[str, np.ndarray]:
        """GGUF blocks of a part: whole rows of the fused tensor's blocks."""
        if name not in self._parts:
            return self.source.raw(name)
        fused, start, end = self._parts[name]
        type_name, blocks = self.source.raw(fused)
        return type_name, np.ascontiguousarray(blocks[start:end])

    def files(self) -> list[Path]:
        return self.source.files()


def _split_of(name: str, fused_weights):
    """(text before the module, `.weight`/`.bias`, the FusedWeight) when `name` is a fused
    tensor, else None."""
    module, dot, kind = name.rpartition(".")
    for fused in fused_weights:
        if module == fused.fused or module.endswith("." + fused.fused):
            return module[:len(module) - len(fused.fused)], dot + kind, fused
    return None
