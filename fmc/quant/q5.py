"""q5_0 and q5_1: llama.cpp's Q5_0 / Q5_1 — 5-bit codes, group 32, float16 scale d (and
minimum m for Q5_1); value = (q − 16)·d, or q·d + m.

Stored as fmc's packed words: the low 4 bits of each code 8 per uint32 ([rows, K/8]), the
5th bits 32 per uint32 ([rows, K/32]), one scale (and minimum) per group. Scales minimise the
weighted squared error (fmc.quant.search; llama.cpp's reference takes absmax/−16 or
(max − min)/31). GGUF Q5_0 / Q5_1 tensors import losslessly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant import search
from fmc.quant.packing import (
    check_groups,
    five_bit,
    grouped,
    join_five_bit,
    split_five_bit,
    split_ggml_blocks,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    pass

GROUP = 32
ZERO = 16  # Q5_0's offset
LEVELS = 31


def ggml_codes(header_and_payload: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Q5_0/Q5_1 block payload (qh: 4 bytes, bit j = 5th bit of element j; qs: 16 bytes, low
    nibbles elements 0–15, high 16–31) → codes [rows, K] in element order."""
    qh = np.ascontiguousarray(header_and_payload[..., :4]).view("<u4")[..., 0]
    qs = header_and_payload[..., 4:]
    low = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    bits = (qh[..., None] >> np.arange(GROUP, dtype=np.uint32)) & 1
    return (low | (bits.astype(np.uint8) << 4)).reshape(shape)


class GGMLQ5(QuantScheme):
    compute_dtype = "float16"
    block_size = GROUP
    output_scheme = "q8f16"

    def __init__(self, with_min: bool):
        self.with_min = with_min
        self.name = "q5_1" if with_min else "q5_0"
        self.gguf_types = ("Q5_1",) if with_min else ("Q5_0",)
        self.bits_per_weight = 5 + (32 if with_min else 16) / GROUP
        self.description = (f"llama.cpp {self.gguf_types[0]}: 5-bit, group {GROUP}, float16 "
                            + ("scale and minimum" if with_min else "scale"))

    def storage(self, shape, tensor):
        check_groups(shape, GROUP, tensor, self.name)
        rows, k = shape
        parts = [StorageTensor("q_weight", (rows, k // 8), "uint32"),
                 StorageTensor("q_high", (rows, k // 32), "uint32"),
                 StorageTensor("q_scale", (rows, k // GROUP), "float16")]
        if self.with_min:
            parts.append(StorageTensor("q_min", (rows, k // GROUP), "float16"))
        return parts

    def quantize(self, weight, importance=None):
        blocks, w = search.weighted_blocks(weight, GROUP, importance)
        if self.with_min:
            scale, minimum = search.affine(blocks, w, LEVELS, nonpositive_min=False)
            d, m = scale.astype(np.float16), minimum.astype(np.float16)
            codes = search.codes_for(blocks, d, 0, LEVELS, m.astype(np.float32)[..., None])
            extra = [m]
        else:
            d = search.symmetric(blocks, w, -ZERO, LEVELS - ZERO).astype(np.float16)
            codes = search.codes_for(blocks, d, -ZERO, LEVELS - ZERO) + ZERO
            extra = []
        low, high = split_five_bit(codes.astype(np.uint8).reshape(weight.shape))
        return [low, high, d, *extra]

    def dequantize(self, stored):
        low, high, d, *extra = stored
        codes = grouped(join_five_bit(low, high).astype(np.float32), GROUP)
        scale = d.astype(np.float32)[..., None]
        if self.with_min:
            values = codes * scale + extra[0].astype(np.float32)[..., None]
        else:
            values = codes * scale - ZERO * scale  # both products exact: (q − 16)·d
        return values.reshape(low.shape[0], -1)

    def dequantize_te(self, stored, out_dtype):
        from tvm import te

        low, high, d, *extra = stored
        rows, k = low.shape[0], low.shape[1] * 8

        def value(i, j):
            code = five_bit(low, high, i, j).astype(out_dtype)
            scale = d[i, j // GROUP].astype(out_dtype)
            if self.with_min:
                return code * scale + extra[0][i, j // GROUP].astype(out_dtype)
            if out_dtype == "float32":  # exact products, one rounding: (q − 16)·d
                return code * scale - scale * float(ZERO)
            return (code - ZERO) * scale

        return te.compute((rows, k), value, name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        header = 2 if self.with_min else 1
        values, payload = split_ggml_blocks(blocks, shape, GROUP, 2 * header + 4 + GROUP // 2,
                                            header=header)
        low, high = split_five_bit(ggml_codes(payload, shape))
        if self.with_min:
            return [low, high, np.ascontiguousarray(values[..., 0]),
                    np.ascontiguousarray(values[..., 1])]
        return [low, high, values]


register(GGMLQ5(with_min=False))
register(GGMLQ5(with_min=True))
