"""q4_1: llama.cpp's Q4_1 — int4, group 32, float16 scale d and minimum m, value = q·d + m.

Each block's (d, m) minimise the weighted squared error (fmc.quant.search.affine; llama.cpp's
reference takes d = (max − min)/15, m = min). GGUF Q4_1 tensors — the format the default
model ships in — import losslessly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant import search
from fmc.quant.packing import (
    check_groups,
    grouped,
    nibble,
    pack_nibbles,
    split_ggml_blocks,
    unpack_nibbles,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    pass

GROUP = 32
LEVELS = 15
BLOCK_BYTES = 4 + GROUP // 2


class GGMLQ4_1(QuantScheme):
    name = "q4_1"
    compute_dtype = "float16"
    bits_per_weight = 4 + 32 / GROUP
    description = f"llama.cpp Q4_1: int4, group {GROUP}, float16 scale and minimum"
    gguf_types = ("Q4_1",)
    block_size = GROUP
    output_scheme = "q8f16"

    def storage(self, shape, tensor):
        check_groups(shape, GROUP, tensor, self.name)
        rows, k = shape
        return [StorageTensor("q_weight", (rows, k // 8), "uint32"),
                StorageTensor("q_scale", (rows, k // GROUP), "float16"),
                StorageTensor("q_min", (rows, k // GROUP), "float16")]

    def quantize(self, weight, importance=None):
        blocks, w = search.weighted_blocks(weight, GROUP, importance)
        scale, minimum = search.affine(blocks, w, LEVELS, nonpositive_min=False)
        d, m = scale.astype(np.float16), minimum.astype(np.float16)
        codes = search.codes_for(blocks, d, 0, LEVELS, m.astype(np.float32)[..., None])
        return [pack_nibbles(codes.astype(np.uint8).reshape(weight.shape)), d, m]

    def dequantize(self, stored):
        words, d, m = stored
        codes = grouped(unpack_nibbles(words).astype(np.float32), GROUP)
        values = codes * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
        return values.reshape(words.shape[0], -1)

    def dequantize_te(self, stored, out_dtype):
        from tvm import te

        words, d, m = stored
        rows, k = words.shape[0], words.shape[1] * 8
        return te.compute(
            (rows, k),
            lambda i, j: nibble(words, i, j).astype(out_dtype) * d[i, j // GROUP].astype(
                out_dtype) + m[i, j // GROUP].astype(out_dtype),
            name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        """GGUF Q4_1 rows: per block fp16 d, fp16 m, then 16 bytes whose low nibbles hold
        elements 0–15 and high nibbles 16–31."""
        header, packed = split_ggml_blocks(blocks, shape, GROUP, BLOCK_BYTES, header=2)
        codes = np.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(shape)
        return [pack_nibbles(codes), header[..., 0], header[..., 1]]


register(GGMLQ4_1())
