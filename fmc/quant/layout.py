"""Row-interleaved storage: any scheme's arrays stored in blocks of B weight rows, with the
rows of a block innermost ([rows/B, …, B] instead of [rows, …]).

A CPU GEMV then gives each SIMD lane its own weight row: one contiguous vector load feeds B
rows, every code of a packed word is a uniform shift, the activation is a broadcast scalar
and the scales are a vector load — no gathers. A target asks for it (`Target.row_block`);
the scheme itself is unchanged: `interleave` wraps it, and the wrapped scheme's name
(`q4f16_rows16`) is what stored parameters and kernels record, so every later step (fusion,
the weights phase) resolves the same layout through the registry."""

from __future__ import annotations

import numpy as np

from fmc.quant.scheme import QuantScheme, StorageTensor

SEPARATOR = "_rows"  # identifier-safe: the name ends up in kernel symbols


class _RowView:
    """A stored TE tensor [rows/B, …, B] indexed as the scheme's [rows, …] (lazily: the
    scheme's dequantize expression reads through it; rows may be gathered by `ids`)."""

    def __init__(self, tensor, block: int, rows, ids=None):
        self.tensor, self.block, self.ids = tensor, block, ids
        self.shape = (rows, *tensor.shape[1:-1])
        self.dtype = tensor.dtype

    def __call__(self, *index):
        row = self.ids[index[0]] if self.ids is not None else index[0]
        return self.tensor[(row // self.block, *index[1:], row % self.block)]

    def __getitem__(self, index):
        return self(*(index if isinstance(index, tuple) else (index,)))


class RowInterleaved(QuantScheme):
    def __init__(self, base: QuantScheme, block: int):
        self.base, self.block = base, block
        self.row_granularity = block
        self.name = f"{base.name}{SEPARATOR}{block}"
        for attribute in ("compute_dtype", "bits_per_weight", "output_scheme", "gguf_types",
                          "block_size", "fallback"):
            setattr(self, attribute, getattr(base, attribute))
        self.description = f"{base.description}; rows interleaved in blocks of {block}"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of `shape` can be stored this way (rows divisible by the row
        block, reduction axis by the scheme's block)."""
        return shape[0] % self.block == 0 and self.base.fits(shape)

    def storage(self, shape, tensor):
        return [StorageTensor(part.name, (part.shape[0] // self.block, *part.shape[1:],
                                          self.block), part.dtype)
                for part in self.base.storage(shape, tensor)]

    def _interleave(self, array: np.ndarray) -> np.ndarray:
        blocks = array.reshape(array.shape[0] // self.block, self.block, *array.shape[1:])
        return np.ascontiguousarray(np.moveaxis(blocks, 1, -1))

    def _deinterleave(self, array: np.ndarray) -> np.ndarray:
        rows = np.moveaxis(array, -1, 1)
        return rows.reshape(array.shape[0] * self.block, *array.shape[1:-1])

    def quantize(self, weight, importance=None):
        parts = self.base.quantize(weight) if importance is None \
            else self.base.quantize(weight, importance)
        return [self._interleave(a) for a in parts]

    def dequantize(self, stored):
        return self.base.dequantize([self._deinterleave(a) for a in stored])

    def views(self, stored, ids=None):
        """The stored TE tensors as the base scheme's [rows, …] tensors (rows = `ids` when
        given: an embedding lookup)."""
        rows = ids.shape[0] if ids is not None else stored[0].shape[0] * self.block
        return [_RowView(t, self.block, rows, ids) for t in stored]

    def dequantize_te(self, stored, out_dtype):
        return self.base.dequantize_te(self.views(stored), out_dtype)

    def from_gguf(self, type_name, blocks, shape):
        return [self._interleave(a) for a in self.base.from_gguf(type_name, blocks, shape)]

    def is_identity(self, dtype):
        return False

    def describe(self):
        return {**self.base.describe(), "name": self.name, "row_block": self.block}


def interleave(scheme: QuantScheme, block: int) -> RowInterleaved:
    return RowInterleaved(scheme, block)


def split_name(name: str) -> tuple[str, int | None]:
    """`q4f16_rows16` → ("q4f16", 16); a plain name → (name, None)."""
    base, sep, block = name.rpartition(SEPARATOR)
    return (base, int(block)) if sep and block.isdigit() and int(block) > 0 else (name, None)
