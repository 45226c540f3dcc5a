"""q0f32 and q0f16: no quantization, weights stored as float32 or float16."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    pass


class Unquantized(QuantScheme):
    """Weights kept as floats of one width; dequantize is a cast (free when widths match)."""

    def __init__(self, name: str, dtype: str, gguf_type: str):
        self.name = name
        self.dtype = dtype
        self.gguf_types = (gguf_type,)
        self.compute_dtype = dtype
        self.bits_per_weight = float(np.dtype(dtype).itemsize * 8)
        self.description = f"no quantization, {dtype} weights"

    def storage(self, shape, tensor):
        return [StorageTensor("weight", tuple(shape), self.dtype)]

    def quantize(self, weight, importance=None):
        return [np.ascontiguousarray(weight, dtype=self.dtype)]

    def dequantize(self, stored):
        return stored[0].astype(np.float32)

    def dequantize_te(self, stored, out_dtype):
        from tvm import te

        (weight,) = stored
        return te.compute(weight.shape, lambda *i: weight(*i).astype(out_dtype), name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        """GGUF F32 / F16 rows are the values themselves."""
        return [np.ascontiguousarray(blocks).view(self.dtype).reshape(shape)]

    def is_identity(self, dtype):
        return dtype == self.dtype


register(Unquantized("q0f32", "float32", "F32"))
register(Unquantized("q0f16", "float16", "F16"))
