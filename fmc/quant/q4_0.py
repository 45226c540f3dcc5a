"""q4_0: llama.cpp's Q4_0 — int4, group 32, float16 scale d, value = (q − 8)·d.

Quantizes as llama.cpp does (d = signed-absmax / −8, q = min(15, ⌊w/d + 8.5⌋)) and imports GGUF
Q4_0 tensors losslessly, repacking llama.cpp's block nibble order into fmc's uint32 layout."""

from __future__ import annotations

import numpy as np

from fmc.quant.packing import (
    dequantize_offset_int4,
    dequantize_offset_int4_te,
    grouped,
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
    output_scheme = "q8f16"

    def storage(self, shape, tensor):
        return int4_storage(shape, GROUP, tensor, self.name, "float16")

    def quantize(self, weight):
        blocks = grouped(weight.astype(np.float32), GROUP)
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(blocks, index, axis=-1)[..., 0]
        d = signed_max / -ZERO
        inverse = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        codes = np.minimum(15, np.trunc(blocks * inverse[..., None] + 8.5)).astype(np.uint8)
        return [pack_nibbles(codes.reshape(weight.shape)), d.astype(np.float16)]

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
