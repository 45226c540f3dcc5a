"""What llama.cpp's K-quants share: super-blocks of 256 weights along the reduction axis,
each with float16 super-scales and small integer sub-block scales.

Q4_K and Q5_K (`AffineKQuant`, registered by q4k.py and q5k.py): eight sub-blocks of 32,
value = d·sc·q − dmin·m, with sc and m 6-bit and packed into 12 bytes per super-block exactly
as GGUF packs them:
- sub-block j < 4: sc = byte[j] & 63, m = byte[j + 4] & 63;
- j ≥ 4: sc = (byte[j + 4] & 15) | (byte[j − 4] >> 6) << 4,
         m  = (byte[j + 4] >> 4) | (byte[j] >> 6) << 4.
fmc stores those 12 bytes unchanged as three little-endian uint32 words per super-block — bytes
0–3, 4–7 and 8–11 in three [rows, K/256] arrays, so a kernel reads each array at one point per
super-block (dlight's GEMV analysis, among others, needs single-point reads) — d and dmin as
[rows, K/256] float16, and the codes in fmc's packed words (low 4 bits [rows, K/8]; Q5_K's 5th
bits [rows, K/32]), so bits per weight equal GGUF's (4.5 and 5.5).

Quantizing (no importance matrix needed): per sub-block, scale and minimum from
fmc.quant.search.affine (ggml's make_qkx2_quants, weights rms + |x|); the eight scales and
eight minimums of a super-block then go to 6 bits against d and dmin chosen by
search.positive_levels (ggml's make_qp_quants, weighted by each sub-block's total weight);
finally every weight is re-rounded against the stored d·sc and dmin·m."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant import search
from fmc.quant.packing import (
    check_groups,
    five_bit,
    join_five_bit,
    nibble,
    pack_nibbles,
    split_five_bit,
    unpack_nibbles,
)
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    from tvm import tirx

SUPER = 256
SUB = 32
SUBS = SUPER // SUB
SCALE_BYTES = 12
SIX_BITS = 63


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit scales and minimums [..., 8] → GGUF's 12 packed bytes [..., 12]."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], SCALE_BYTES), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    return out


def unpack_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF's 12 packed bytes [..., 12] → (scales, minimums) uint8 [..., 8]."""
    low, mid, top = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 63, (top & 15) | ((low >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def to_words(packed: np.ndarray) -> list[np.ndarray]:
    """12 packed bytes per super-block [rows, S·12] → three uint32 arrays [rows, S] (bytes
    0–3, 4–7, 8–11, little-endian)."""
    rows = packed.shape[0]
    words = np.ascontiguousarray(packed.reshape(rows, -1, 3, 4)).view("<u4")[..., 0]
    return [np.ascontiguousarray(words[:, :, i]).astype(np.uint32) for i in range(3)]


def from_words(words: list[np.ndarray]) -> np.ndarray:
    """Inverse of `to_words`: uint8 [rows, S·12]."""
    stacked = np.stack([w.astype("<u4") for w in words], axis=-1)  # [rows, S, 3]
    return np.ascontiguousarray(stacked).view(np.uint8).reshape(stacked.shape[0], -1)


def unpack_scale_min(words, sub) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(sc, m) of sub-block `sub` (0–7) from a super-block's three packed-scale words (bytes
    0–3, 4–7, 8–11), as uint32 expressions. The words may be scalars (the TE dequantize) or
    vectors of 16 rows (the CPU's integer-dot kernel): GGUF's 6-bit packing, written once."""
    from tvm import tirx

    shift = (sub % 4 * 8).astype("uint32")
    low, mid, top = ((w >> shift) & tirx.const(255, "uint32") for w in words)
    six, four = tirx.const(63, "uint32"), tirx.const(15, "uint32")
    low_half = sub < 4
    sc = tirx.Select(low_half, low & six, (top & four) | ((low >> 6) << 4))
    m = tirx.Select(low_half, mid & six, (top >> 4) | ((mid >> 6) << 4))
    return sc, m


def scale_min_te(words, row, k) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(sc, m) of the sub-block holding element `k` of `row`, as uint32 expressions over the
    three packed-scale word arrays; each array is read at the element's super-block only."""
    return unpack_scale_min([w[row, k // SUPER] for w in words], k // SUB % SUBS)


def quantize_affine(weight: np.ndarray, importance, nmax: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K quantization of a [rows, K] weight: (codes [rows, K] in 0..nmax,
    packed scale bytes [rows, K/256·12], d, dmin float16 [rows, K/256])."""
    rows, k = weight.shape
    blocks, w = search.weighted_blocks(weight, SUB, importance)
    flat, flat_w = blocks.reshape(-1, SUB), w.reshape(-1, SUB)
    scale, minimum = search.affine(flat, flat_w, nmax, nonpositive_min=True)
    supers = rows * (k // SUPER)
    scale = scale.reshape(supers, SUBS)
    depth = (-minimum).reshape(supers, SUBS)  # ≥ 0: subtracted
    sub_weight = flat_w.sum(axis=-1).reshape(supers, SUBS)
    d = search.positive_levels(scale, sub_weight, SIX_BITS).astype(np.float16)
    dmin = search.positive_levels(depth, sub_weight, SIX_BITS).astype(np.float16)
    sc = _levels(scale, d)
    m = _levels(depth, dmin)
    sub_scale = (d.astype(np.float32)[:, None] * sc).reshape(-1)
    sub_depth = (dmin.astype(np.float32)[:, None] * m).reshape(-1)
    codes = search.codes_for(flat, sub_scale, 0, nmax, -sub_depth[:, None])
    return (codes.astype(np.uint8).reshape(rows, k), pack_scales(sc, m).reshape(rows, -1),
            d.reshape(rows, -1), dmin.reshape(rows, -1))


def _levels(values: np.ndarray, step: np.ndarray) -> np.ndarray:
    step = step.astype(np.float32)[:, None]
    ratio = np.divide(values, step, out=np.zeros_like(values), where=step > 0)
    return np.clip(np.rint(ratio), 0, SIX_BITS)


def dequantize_affine(codes: np.ndarray, packed: np.ndarray, d: np.ndarray,
                      dmin: np.ndarray) -> np.ndarray:
    """(d·sc)·q − dmin·m in float32, as gguf computes it (every product exact)."""
    rows, k = codes.shape
    sc, m = unpack_scales(packed.reshape(rows, k // SUPER, SCALE_BYTES))
    scale = d.astype(np.float32)[..., None] * sc.astype(np.float32)
    depth = dmin.astype(np.float32)[..., None] * m.astype(np.float32)
    values = scale[..., None] * codes.reshape(rows, k // SUPER, SUBS, SUB).astype(np.float32)
    return (values - depth[..., None]).reshape(rows, k)


def ggml_affine_blocks(blocks: np.ndarray, shape: tuple[int, int], with_high: bool):
    """GGUF Q4_K / Q5_K rows → (codes [rows, K] in element order, packed scales, d, dmin).

    A block is d, dmin (fp16), 12 scale bytes, [Q5_K: 32 bytes of 5th bits], 128 bytes of
    nibbles: each 32-byte chunk c holds elements 64c + l (low nibble) and 64c + 32 + l
    (high nibble); Q5_K's bit 2c of qh[l] is the 5th bit of 64c + l, bit 2c + 1 of 64c+32+l."""
    rows, k = shape
    supers = k // SUPER
    raw = blocks.reshape(rows, supers, -1)
    header = np.ascontiguousarray(raw[..., :4]).view(np.float16)
    d, dmin = header[..., 0], header[..., 1]
    packed = raw[..., 4:4 + SCALE_BYTES]
    offset = 4 + SCALE_BYTES
    qh = raw[..., offset:offset + SUPER // 8] if with_high else None
    qs = raw[..., offset + (SUPER // 8 if with_high else 0):].reshape(rows, supers, 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=3)  # [rows, supers, chunk, half, 32]
    if with_high:
        bits = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
        high = (qh[:, :, None, None, :] >> bits) & 1
        codes = codes | (high << 4)
    return (codes.reshape(rows, k), np.ascontiguousarray(packed).reshape(rows, -1),
            np.ascontiguousarray(d), np.ascontiguousarray(dmin))


class AffineKQuant(QuantScheme):
    """Q4_K (bits 4) and Q5_K (bits 5) in fmc's packed words."""

    compute_dtype = "float16"
    block_size = SUPER
    output_scheme = "q6k"

    def __init__(self, bits: int, fallback: str):
        self.bits = bits
        self.nmax = (1 << bits) - 1
        self.name = f"q{bits}k"
        self.gguf_types = (f"Q{bits}_K",)
        self.fallback = fallback
        self.bits_per_weight = bits + (SCALE_BYTES * 8 + 32) / SUPER
        self.description = (f"llama.cpp Q{bits}_K: super-blocks of {SUPER}, {SUBS} sub-blocks "
                            f"of {SUB} with 6-bit scales and minimums, float16 d and dmin")

    def storage(self, shape, tensor):
        check_groups(shape, SUPER, tensor, self.name)
        rows, k = shape
        high = [StorageTensor("q_high", (rows, k // 32), "uint32")] if self.bits == 5 else []
        return [StorageTensor("q_weight", (rows, k // 8), "uint32"), *high,
                *(StorageTensor(f"q_scales{i}", (rows, k // SUPER), "uint32") for i in range(3)),
                StorageTensor("q_d", (rows, k // SUPER), "float16"),
                StorageTensor("q_dmin", (rows, k // SUPER), "float16")]

    def _pack(self, codes, packed, d, dmin):
        if self.bits == 5:
            low, high = split_five_bit(codes)
            return [low, high, *to_words(packed), d, dmin]
        return [pack_nibbles(codes), *to_words(packed), d, dmin]

    def _codes(self, stored):
        """(codes [rows, K], packed scale bytes, d, dmin) from the stored arrays."""
        codes = join_five_bit(stored[0], stored[1]) if self.bits == 5 \
            else unpack_nibbles(stored[0])
        return codes, from_words(stored[-5:-2]), stored[-2], stored[-1]

    def quantize(self, weight, importance=None):
        return self._pack(*quantize_affine(weight, importance, self.nmax))

    def dequantize(self, stored):
        return dequantize_affine(*self._codes(stored))

    def dequantize_te(self, stored, out_dtype):
        from tvm import te

        words = stored[0]
        scale_words, (d, dmin) = stored[-5:-2], stored[-2:]
        rows, k = words.shape[0], words.shape[1] * 8

        def value(i, j):
            code = five_bit(words, stored[1], i, j) if self.bits == 5 else nibble(words, i, j)
            sc, m = scale_min_te(scale_words, i, j)
            scale = d[i, j // SUPER].astype(out_dtype) * sc.astype(out_dtype)
            depth = dmin[i, j // SUPER].astype(out_dtype) * m.astype(out_dtype)
            return scale * code.astype(out_dtype) - depth

        return te.compute((rows, k), value, name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        return self._pack(*ggml_affine_blocks(blocks, shape, with_high=self.bits == 5))
