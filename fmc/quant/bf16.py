"""q0bf16: no quantization, weights stored as bfloat16 (the top 16 bits of a float32).

Held as uint16 bit patterns (numpy has no bfloat16) and widened to float32 by a shift in the
kernel, which is exact. GGUF BF16 tensors import bit for bit; float32 weights are rounded to
nearest even."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    pass


def to_bfloat16_bits(weight: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(weight, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


class BFloat16(QuantScheme):
    name = "q0bf16"
    compute_dtype = "float32"
    bits_per_weight = 16.0
    description = "no quantization, bfloat16 weights (uint16 bit patterns)"
    gguf_types = ("BF16",)

    def storage(self, shape, tensor):
        return [StorageTensor("weight", tuple(shape), "uint16")]

    def quantize(self, weight, importance=None):
        return [to_bfloat16_bits(weight)]

    def dequantize(self, stored):
        return (stored[0].astype(np.uint32) << 16).view(np.float32)

    def dequantize_te(self, stored, out_dtype):
        from tvm import te, tirx

        (bits,) = stored

        def value(*index):
            wide = tirx.reinterpret("float32", bits(*index).astype("uint32") << 16)
            return wide if out_dtype == "float32" else wide.astype(out_dtype)

        return te.compute(bits.shape, value, name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        return [np.ascontiguousarray(blocks).view(np.uint16).reshape(shape)]


register(BFloat16())
