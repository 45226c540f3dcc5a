"""q6k: llama.cpp's Q6_K — 6-bit codes in super-blocks of 256: sixteen sub-blocks of 16 with
int8 scales and one float16 d; value = d·sc·(q − 32); 6.5625 bits per weight.

fmc's storage: the low 4 bits of each code 8 per uint32 ([rows, K/8]), the top 2 bits 16 per
uint32 ([rows, K/16]), the int8 sub-block scales [rows, K/16] and d [rows, K/256]. Sub-block
scales minimise the weighted squared error (fmc.quant.search, as ggml's make_qx_quants does),
then go to int8 against d = max/−128. A weight whose reduction axis is not a multiple of 256
falls back to q8f16 (llama.cpp: Q8_0). GGUF Q6_K tensors import losslessly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant import search
from fmc.quant.packing import (
    check_groups,
    field,
    nibble,
    pack_fields,
    pack_nibbles,
    unpack_fields,
    unpack_nibbles,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    pass

SUPER = 256
SUB = 16
ZERO = 32
BLOCK_BYTES = 210


class GGMLQ6K(QuantScheme):
    name = "q6k"
    compute_dtype = "float16"
    bits_per_weight = 6 + (SUPER // SUB * 8 + 16) / SUPER
    description = (f"llama.cpp Q6_K: super-blocks of {SUPER}, {SUPER // SUB} sub-blocks of "
                   f"{SUB} with int8 scales, float16 d")
    gguf_types = ("Q6_K",)
    block_size = SUPER
    fallback = "q8f16"

    def storage(self, shape, tensor):
        check_groups(shape, SUPER, tensor, self.name)
        rows, k = shape
        return [StorageTensor("q_weight", (rows, k // 8), "uint32"),
                StorageTensor("q_high", (rows, k // 16), "uint32"),
                StorageTensor("q_scales", (rows, k // SUB), "int8"),
                StorageTensor("q_d", (rows, k // SUPER), "float16")]

    def quantize(self, weight, importance=None):
        rows, k = weight.shape
        blocks, w = search.weighted_blocks(weight, SUB, importance)
        flat = blocks.reshape(-1, SUB)
        scale = search.symmetric(flat, w.reshape(-1, SUB), -ZERO, ZERO - 1)
        scale = scale.reshape(-1, SUPER // SUB)
        index = np.abs(scale).argmax(axis=-1)[:, None]
        extreme = np.take_along_axis(scale, index, axis=-1)[:, 0]
        d = (extreme / -128).astype(np.float16)
        step = d.astype(np.float32)[:, None]
        ratio = np.divide(scale, step, out=np.zeros_like(scale), where=step != 0)
        sc = np.clip(np.rint(ratio), -128, 127)
        sub_scale = (step * sc).reshape(-1)
        codes = search.codes_for(flat, sub_scale, -ZERO, ZERO - 1) + ZERO
        codes = codes.astype(np.uint8).reshape(rows, k)
        return [pack_nibbles(codes & 0xF), pack_fields(codes >> 4, 2),
                sc.astype(np.int8).reshape(rows, -1), d.reshape(rows, -1)]

    def dequantize(self, stored):
        low, high, sc, d = stored
        rows = low.shape[0]
        codes = unpack_nibbles(low) | (unpack_fields(high, 2) << 4)
        levels = codes.astype(np.int32) - ZERO
        scale = d.astype(np.float32)[..., None] * sc.reshape(rows, d.shape[1], -1).astype(
            np.float32)  # exact: 11-bit d times a 7-bit scale
        values = scale[..., None] * levels.reshape(rows, d.shape[1], -1, SUB).astype(
            np.float32)
        return values.reshape(rows, -1)

    def dequantize_te(self, stored, out_dtype):
        from tvm import te

        low, high, sc, d = stored
        rows, k = low.shape[0], low.shape[1] * 8

        def value(i, j):
            code = nibble(low, i, j) | (field(high, i, j, 2) << 4)
            level = code.astype("int32") - ZERO
            scale = d[i, j // SUPER].astype(out_dtype) * sc[i, j // SUB].astype(out_dtype)
            return scale * level.astype(out_dtype)

        return te.compute((rows, k), value, name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        """GGUF Q6_K block: ql[128], qh[64], int8 scales[16], fp16 d. In each half h of 128
        elements, ql[64h + l] holds elements l (low nibble) and 64 + l (high), ql[64h+32+l]
        elements 32 + l and 96 + l; qh[32h + l] holds the top 2 bits of l, 32+l, 64+l, 96+l
        (bits 0–1, 2–3, 4–5, 6–7)."""
        rows, k = shape
        raw = blocks.reshape(rows, k // SUPER, BLOCK_BYTES)
        ql = raw[..., :128].reshape(rows, -1, 2, 2, 32)  # [.., half, first/second 32, l]
        qh = raw[..., 128:192].reshape(rows, -1, 2, 1, 32)
        low = np.stack([ql & 0xF, ql >> 4], axis=3)  # [.., half, nibble, quarter, l]
        top = (qh >> (np.arange(4, dtype=np.uint8) * 2).reshape(1, 1, 1, 4, 1)) & 3
        top = top.reshape(rows, -1, 2, 2, 2, 32)  # quarter q = 2·nibble + first/second
        codes = (low | (top << 4)).reshape(rows, k)
        sc = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).reshape(rows, -1)
        d = np.ascontiguousarray(raw[..., 208:210]).view(np.float16).reshape(rows, -1)
        return [pack_nibbles(codes & 0xF), pack_fields(codes >> 4, 2), sc, d]


register(GGMLQ6K())
