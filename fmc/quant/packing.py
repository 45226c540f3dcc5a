"""Shared layout helpers: 4-bit codes packed 8 per uint32 along the reduction axis (element j
of a row in nibble j % 8 of word j // 8, low nibble first), and per-group scales."""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from fmc.errors import InputError
from fmc.quant.scheme import StorageTensor

NIBBLES_PER_WORD = 8
_SHIFTS = np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * 4


def check_groups(shape: tuple[int, ...], group: int, tensor: str, scheme: str) -> None:
    """A weight must be 2-D with a reduction axis divisible by the scheme's group size."""
    if len(shape) != 2:
        raise InputError(f"tensor {tensor!r}: scheme {scheme} needs a 2-D weight, "
                         f"got shape {list(shape)}")
    if shape[1] % group:
        raise InputError(f"tensor {tensor!r}: reduction dimension {shape[1]} is not a "
                         f"multiple of {scheme}'s group size {group}")


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, K] (0..15) → uint32 [rows, K/8]."""
    rows, k = codes.shape
    words = codes.astype(np.uint32).reshape(rows, k // NIBBLES_PER_WORD, NIBBLES_PER_WORD)
    return np.bitwise_or.reduce(words << _SHIFTS, axis=-1).astype(np.uint32)


def unpack_nibbles(words: np.ndarray) -> np.ndarray:
    """uint32 [rows, K/8] → uint8 codes [rows, K]."""
    rows, count = words.shape
    codes = (words[:, :, None] >> _SHIFTS) & 0xF
    return codes.reshape(rows, count * NIBBLES_PER_WORD).astype(np.uint8)


def nibble(words, row, k) -> tirx.PrimExpr:
    """TE/TIR expression for code `k` of `row` in packed `words` (as uint32)."""
    shift = (k % NIBBLES_PER_WORD * 4).astype("uint32")
    return (words[row, k // NIBBLES_PER_WORD] >> shift) & tirx.const(0xF, "uint32")


def grouped(weight: np.ndarray, group: int) -> np.ndarray:
    """[rows, K] → [rows, K/group, group] view."""
    rows, k = weight.shape
    return weight.reshape(rows, k // group, group)


def absmax_scales(weight: np.ndarray, group: int, levels: int, dtype: str) -> np.ndarray:
    """Per-group scale absmax/levels, rounded to the stored dtype [rows, K/group]."""
    return (np.abs(grouped(weight, group)).max(axis=-1) / levels).astype(dtype)


def divide_by_scales(weight: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """w / scale per group as [rows, K/group, group] float32; 0 where a group's scale is 0
    (an all-zero group, whose codes then encode zero)."""
    blocks = grouped(weight.astype(np.float32, copy=False), group)
    divisor = np.broadcast_to(scales.astype(np.float32)[..., None], blocks.shape)
    return np.divide(blocks, divisor, out=np.zeros_like(blocks), where=divisor != 0)


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

    In float32 it is written code·scale − zero·scale: both products are exact (4-bit code,
    float16 scale), so the one rounding of the difference gives (code − zero)·scale bit for
    bit, and the CPU does it in one FMA with zero·scale hoisted per group. In float16 the
    products would round: there it stays (code − zero)·scale."""
    words, scales = stored
    rows, k = words.shape[0], words.shape[1] * NIBBLES_PER_WORD

    def value(i, j):
        code = nibble(words, i, j).astype(out_dtype)
        scale = scales[i, j // group].astype(out_dtype)
        if out_dtype == "float32":
            return code * scale - scale * float(zero)
        return (code - zero) * scale

    return te.compute((rows, k), value, name="dequantize")


def split_ggml_blocks(blocks: np.ndarray, shape: tuple[int, int], group: int,
                      block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF rows of blocks that start with an fp16 scale (Q4_0, Q8_0) → (scales float16
    [rows, K/group], payload bytes uint8 [rows, K/group, block_bytes − 2])."""
    rows, k = shape
    raw = blocks.reshape(rows, k // group, block_bytes)
    scales = np.ascontiguousarray(raw[..., :2]).view(np.float16)[..., 0]
    return np.ascontiguousarray(scales), raw[..., 2:]
