"""Shared layout helpers: codes packed into uint32 words along the reduction axis — 4-bit
codes 8 per word (element j of a row in nibble j % 8 of word j // 8, low nibble first), and
generally b-bit fields 32/b per word (the 5th bits of Q5 codes, the top 2 bits of Q6_K's) —
and per-group scales."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.errors import InputError
from fmc.quant.scheme import StorageTensor

if TYPE_CHECKING:
    from tvm import tirx

NIBBLES_PER_WORD = 8


def check_groups(shape: tuple[int, ...], group: int, tensor: str, scheme: str) -> None:
    """A weight must be 2-D with a reduction axis divisible by the scheme's group size."""
    if len(shape) != 2:
        raise InputError(f"tensor {tensor!r}: scheme {scheme} needs a 2-D weight, "
                         f"got shape {list(shape)}")
    if shape[1] % group:
        raise InputError(f"tensor {tensor!r}: reduction dimension {shape[1]} is not a "
                         f"multiple of {scheme}'s group size {group}")


def pack_fields(codes: np.ndarray, width: int) -> np.ndarray:
    """Unsigned codes [rows, K] of `width` bits → uint32 [rows, K·width/32]: element j in
    field j % (32/width) of word j // (32/width), lowest field first."""
    per_word = 32 // width
    rows, k = codes.shape
    words = codes.astype(np.uint32).reshape(rows, k // per_word, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * width
    return np.bitwise_or.reduce(words << shifts, axis=-1).astype(np.uint32)


def unpack_fields(words: np.ndarray, width: int) -> np.ndarray:
    """uint32 [rows, W] → uint8 codes [rows, W·32/width] (inverse of `pack_fields`)."""
    per_word = 32 // width
    rows, count = words.shape
    shifts = np.arange(per_word, dtype=np.uint32) * width
    codes = (words[:, :, None] >> shifts) & np.uint32((1 << width) - 1)
    return codes.reshape(rows, count * per_word).astype(np.uint8)


def field(words, row, k, width: int) -> tirx.PrimExpr:
    """TE/TIR expression for the `width`-bit code `k` of `row` in packed `words` (uint32)."""
    from tvm import tirx

    per_word = 32 // width
    shift = (k % per_word * width).astype("uint32")
    return (words[row, k // per_word] >> shift) & tirx.const((1 << width) - 1, "uint32")


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, K] (0..15) → uint32 [rows, K/8]."""
    return pack_fields(codes, 4)


def unpack_nibbles(words: np.ndarray) -> np.ndarray:
    """uint32 [rows, K/8] → uint8 codes [rows, K]."""
    return unpack_fields(words, 4)


def nibble(words, row, k) -> tirx.PrimExpr:
    """TE/TIR expression for code `k` of `row` in packed `words` (as uint32)."""
    return field(words, row, k, 4)


def split_five_bit(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5-bit codes [rows, K] → (low nibbles packed [rows, K/8], 5th bits packed [rows, K/32])."""
    return pack_nibbles(codes & 0xF), pack_fields(codes >> 4, 1)


def join_five_bit(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Inverse of `split_five_bit`: uint8 codes [rows, K]."""
    return unpack_nibbles(low) | (unpack_fields(high, 1) << 4)


def five_bit(low, high, row, k) -> tirx.PrimExpr:
    """TE/TIR expression for 5-bit code `k` of `row` stored by `split_five_bit`."""
    return nibble(low, row, k) | (field(high, row, k, 1) << 4)


def grouped(weight: np.ndarray, group: int) -> np.ndarray:
    """[rows, K] → [rows, K/group, group] view."""
    rows, k = weight.shape
    return weight.reshape(rows, k // group, group)


def int4_storage(shape: tuple[int, ...], group: int, tensor: str, scheme: str,
                 scale_dtype: str) -> list[StorageTensor]:
    """4-bit codes packed along K plus one scale per group: [rows, K/8] and [rows, K/group]."""
    check_groups(shape, group, tensor, scheme)
    rows, k = shape
    return [StorageTensor("q_weight", (rows, k // NIBBLES_PER_WORD), "uint32"),
            StorageTensor("q_scale", (rows, k // group), scale_dtype)]


def dequantize_offset_int4(stored: list[np.ndarray], zero: int, group: int) -> np.ndarray:
    """(code − zero)·scale for packed 4-bit codes, in float32 (numpy reference)."""
    words, scales = stored
    codes = grouped(unpack_nibbles(words).astype(np.float32) - zero, group)
    return (codes * scales.astype(np.float32)[..., None]).reshape(codes.shape[0], -1)


def dequantize_offset_int4_te(stored, zero: int, group: int, out_dtype: str):
    """The same as a TE compute named `dequantize`.

    With float16 scales and float32 output it is written code·scale − zero·scale: both
    products are exact (4-bit code, 11-bit scale), so the one rounding of the difference gives
    (code − zero)·scale bit for bit, and the CPU does it in one FMA with zero·scale hoisted per
    group. With float32 scales the products would round (q4f32), and in float16 too: there it
    stays (code − zero)·scale."""
    from tvm import te

    words, scales = stored
    rows, k = words.shape[0], words.shape[1] * NIBBLES_PER_WORD
    exact_products = out_dtype == "float32" and str(scales.dtype) == "float16"

    def value(i, j):
        code = nibble(words, i, j).astype(out_dtype)
        scale = scales[i, j // group].astype(out_dtype)
        if exact_products:
            return code * scale - scale * float(zero)
        return (code - zero) * scale

    return te.compute((rows, k), value, name="dequantize")


def split_ggml_blocks(blocks: np.ndarray, shape: tuple[int, int], group: int,
                      block_bytes: int, header: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """GGUF rows of blocks that start with `header` fp16 values (Q4_0, Q8_0: d; Q4_1,
    Q5_1: d and m) → (those values float16 [rows, K/group] when header is 1, else
    [rows, K/group, header]; payload bytes uint8 [rows, K/group, rest])."""
    rows, k = shape
    raw = blocks.reshape(rows, k // group, block_bytes)
    values = np.ascontiguousarray(raw[..., :2 * header]).view(np.float16)
    values = np.ascontiguousarray(values[..., 0] if header == 1 else values)
    return values, raw[..., 2 * header:]
