"""q4_0: llama.cpp's Q4_0 — int4, group 32, float16 scale d, value = (q − 8)·d.

Each block's d minimises the weighted squared error (fmc.quant.search; llama.cpp's own
reference takes d = signed absmax / −8), then q = clamp(round(w/d) + 8, 0, 15). GGUF Q4_0
tensors import losslessly, llama.cpp's block nibble order repacked into fmc's uint32 layout."""

from __future__ import annotations

import numpy as np

from fmc.quant import search
from fmc.quant.packing import (
    dequantize_offset_int4,
    dequantize_offset_int4_te,
    int4_storage,
    pack_nibbles,
    split_ggml_blocks,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme

GROUP = 32
ZERO = 8
Q4_0_BLOCK_BYTES = 2 + GROUP // 2


class GGMLQ4_0(QuantScheme):
    name = "q4_0"
    compute_dtype = "float16"
    bits_per_weight = 4 + 16 / GROUP
    description = f"llama.cpp Q4_0: int4, group {GROUP}, float16 scale, zero point {ZERO}"
    gguf_types = ("Q4_0",)
    block_size = GROUP
    output_scheme = "q8f16"

    def storage(self, shape, tensor):
        return int4_storage(shape, GROUP, tensor, self.name, "float16")

    def quantize(self, weight, importance=None):
        blocks, w = search.weighted_blocks(weight, GROUP, importance)
        d = search.symmetric(blocks, w, -ZERO, ZERO - 1).astype(np.float16)
        codes = search.codes_for(blocks, d, -ZERO, ZERO - 1) + ZERO
        return [pack_nibbles(codes.astype(np.uint8).reshape(weight.shape)), d]

    def dequantize(self, stored):
        return dequantize_offset_int4(stored, ZERO, GROUP)

    def dequantize_te(self, stored, out_dtype):
        return dequantize_offset_int4_te(stored, ZERO, GROUP, out_dtype)

    def from_gguf(self, type_name, blocks, shape):
        """GGUF Q4_0 rows: per block fp16 d, then 16 bytes whose low nibbles hold elements
        0–15 and high nibbles 16–31."""
        scales, packed = split_ggml_blocks(blocks, shape, GROUP, Q4_0_BLOCK_BYTES)
        codes = np.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(shape)
        return [pack_nibbles(codes), scales]


register(GGMLQ4_0())
