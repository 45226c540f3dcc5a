"""Shared layout helpers: 4-bit codes packed 8 per uint32 along the reduction axis (element j
of a row in nibble j % 8 of word j // 8, low nibble first), and per-group scales."""

from __future__ import annotations

import numpy as np
from tvm import tirx

from fmc.errors import InputError

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
