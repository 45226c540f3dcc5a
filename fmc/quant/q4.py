"""q4f16 / q4f32: int4, group 32, value = (q − 7)·scale.

The layout of MLC-LLM's q4f16_1: codes packed 8 per uint32 along the reduction axis,
[rows, K/8]; scales [rows, K/32] in float16 (q4f16) or float32. MLC quantizes with
scale = absmax/7 and q = clamp(round(w/scale) + 7, 0, 14), which leaves code 15 unused. fmc
uses all 16 codes (q − 7 in −7..8; the dequantize, fmc's and MLC's, never clamps), and each
group's scale — of either sign, so the group's extreme can land on −7 or on +8 — minimises
the weighted squared error (fmc.quant.search); then q = clamp(round(w/scale) + 7, 0, 15)
against the stored scale."""

from __future__ import annotations

import numpy as np

from fmc.quant import search
from fmc.quant.packing import (
    dequantize_offset_int4,
    dequantize_offset_int4_te,
    int4_storage,
    pack_nibbles,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme

GROUP = 32
ZERO = 7
TOP = 15 - ZERO  # the largest level, code 15


class SymmetricInt4(QuantScheme):
    block_size = GROUP
    output_scheme = "q8f16"

    def __init__(self, name: str, scale_dtype: str):
        self.name = name
        self.scale_dtype = scale_dtype
        self.compute_dtype = scale_dtype
        self.bits_per_weight = 4 + np.dtype(scale_dtype).itemsize * 8 / GROUP
        self.description = (f"int4 (q − 7)·s, group {GROUP}, {scale_dtype} error-minimising "
                            "scales, 8 codes per uint32 along K (MLC q4f16_1's layout)")

    def storage(self, shape, tensor):
        return int4_storage(shape, GROUP, tensor, self.name, self.scale_dtype)

    def quantize(self, weight, importance=None):
        blocks, w = search.weighted_blocks(weight, GROUP, importance)
        scales = search.symmetric(blocks, w, -ZERO, TOP).astype(self.scale_dtype)
        codes = search.codes_for(blocks, scales, -ZERO, TOP) + ZERO
        return [pack_nibbles(codes.astype(np.uint8).reshape(weight.shape)), scales]

    def dequantize(self, stored):
        return dequantize_offset_int4(stored, ZERO, GROUP)

    def dequantize_te(self, stored, out_dtype):
        return dequantize_offset_int4_te(stored, ZERO, GROUP, out_dtype)


register(SymmetricInt4("q4f16", "float16"))
register(SymmetricInt4("q4f32", "float32"))
