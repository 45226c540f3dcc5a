"""q4f16 / q4f32: symmetric int4, group 32, scale = absmax/7, value = (q − 7)·scale.

The layout of MLC-LLM's q4f16_1: codes q = clamp(round(w/scale) + 7, 0, 14) packed 8 per uint32
along the reduction axis, [rows, K/8]; scales [rows, K/32] in float16 (q4f16) or float32."""

from __future__ import annotations

import numpy as np

from fmc.quant.packing import (
    absmax_scales,
    dequantize_offset_int4,
    dequantize_offset_int4_te,
    divide_by_scales,
    int4_storage,
    pack_nibbles,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme

GROUP = 32
ZERO = 7


class SymmetricInt4(QuantScheme):
    output_scheme = "q8f16"

    def __init__(self, name: str, scale_dtype: str):
        self.name = name
        self.scale_dtype = scale_dtype
        self.compute_dtype = scale_dtype
        self.bits_per_weight = 4 + np.dtype(scale_dtype).itemsize * 8 / GROUP
        self.description = (f"symmetric int4, group {GROUP}, {scale_dtype} absmax/7 scales, "
                            "8 codes per uint32 along K")

    def storage(self, shape, tensor):
        return int4_storage(shape, GROUP, tensor, self.name, self.scale_dtype)

    def quantize(self, weight):
        scales = absmax_scales(weight, GROUP, ZERO, self.scale_dtype)
        scaled = divide_by_scales(weight, scales, GROUP)
        codes = np.clip(np.rint(scaled) + ZERO, 0, 2 * ZERO).astype(np.uint8)
        return [pack_nibbles(codes.reshape(weight.shape)), scales]

    def dequantize(self, stored):
        return dequantize_offset_int4(stored, ZERO, GROUP)

    def dequantize_te(self, stored, out_dtype):
        return dequantize_offset_int4_te(stored, ZERO, GROUP, out_dtype)

register(SymmetricInt4("q4f16", "float16"))
register(SymmetricInt4("q4f32", "float32"))
