"""Integer-dot matmuls for the CPU: y = W·x with 4- or 8-bit weights and int8 activations,
for one token (decode GEMV) or many (prefill GEMM).

The float path decodes every code to float32 and takes one FMA per code, row and token. These
kernels do what llama.cpp does on x86: quantize each token's activations once per call to
int8 in blocks of 32 (scale amax/127, plus each block's sum of codes), multiply the weights'
codes with them in integer arithmetic — `vpdpbusd` (AVX-512 VNNI) multiplies 4 unsigned bytes
by 4 signed bytes and adds them into an int32 lane — and apply the float scales once per
group:

    y[t, n] = Σ_g s[n, g] · xd[t, g] · (Σ_{k∈g} c[n, k] · xq[t, k] − z · Σ_{k∈g} xq[t, k])

for value = (c − z)·s (q4f16, q4f32: z = 7; q4_0: z = 8; q5_0: z = 16; q6k: z = 32 and
s = d·sc per sub-block of 16; q8f16: the signed code c − 128 is stored, read as the unsigned
byte c, z = 128), and for value = c·s + m (q4_1, q5_1; q4k and q5k, whose s = d·sc and
m = −dmin·m' come from 6-bit sub-block scales)

    y[t, n] = Σ_g xd[t, g] · (s[n, g] · Σ_{k∈g} c[n, k] · xq[t, k] + m[n, g] · Σ_{k∈g} xq[t, k]).

Weights are the CPU's row-interleaved layout (rows innermost in blocks of 16), so lane r of
the int32 accumulator is row r:
- 4-bit: [N/16, K/8, 16] uint32 words. One 64-byte load holds a word of each of 16 rows;
  `w & 0x0F0F0F0F` gives codes 0, 2, 4, 6 as bytes and `(w >> 4) & 0x0F0F0F0F` codes
  1, 3, 5, 7, and the activation bytes are packed in that order, so no shuffle is needed.
- 5- and 6-bit codes add their top bits, 32/h fields of h bits per uint32 ([N/16, K·h/32,
  16], element j in field j % (32/h)). They join the low nibbles before the dot product:
  `vpmultishiftqb` (AVX-512 VBMI) picks, for every byte, 8 bits at any offset of its 64-bit
  lane (two rows' words), so one instruction with a constant control moves the top bits of
  the 4 codes a byte lane holds to bits 4…4+h−1, and an AND and an OR make the 5- or 6-bit
  code bytes (0…63) that `vpdpbusd` multiplies like 4-bit ones.
- 8-bit: [N/16, K, 16] int8. One 64-byte load holds 4 consecutive k of 16 rows, k-major;
  a byte shuffle (`vpermb` with AVX-512 VBMI) transposes it to 4 k per row lane, and an xor
  with 0x80 makes the signed codes unsigned.

Many tokens: each task (two row blocks) walks the tokens in tiles of TOKEN_TILE, so a
weight word is loaded and unpacked once per tile and feeds TOKEN_TILE dot products; the
activations are quantized first, in parallel over tokens.

The grouped expert GEMM (fmc.nn_moe: rows in blocks of GROUP_ROWS, each block against one
expert's weight, the experts' arrays stacked [E, …]) is the many-token kernel per block: a
task is (row blocks, block), its weights those of the block's expert, its tokens the
block's rows; blocks marked EMPTY_BLOCK are skipped (their outputs zeroed). The gathered
expert GEMVs of MoE decode (x [T, K] or, for down_proj, a row per slot [T, k, K]; each
token's k chosen experts [T, k]) are one-token GEMVs: a task is (row blocks, token, slot),
its weights those of the slot's expert.

The integer sums are exact; the result differs from the float path by the rounding of the
activations to int8 only (the tolerance is in docs/quantization.md)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from fmc.nn_moe import EMPTY_BLOCK, GROUP_ROWS
from fmc.quant.kquant import SUBS, SUPER, unpack_scale_min

LANES = 16  # int32/float32 lanes of a 512-bit vector = weight rows per row block
GROUP = 32  # weights per activation block (and per scale, except q6k's 16)
WORDS_PER_GROUP = GROUP // 4  # vpdpbusd steps per group and row block (4 bytes per lane)
ROW_BLOCKS = 2  # row blocks per task of a many-token kernel
TOKEN_TILE = 4  # tokens per weight load in a GEMM (2 row blocks × 4 tokens accumulators)
VNNI = "llvm.x86.avx512.vpdpbusd.512"
MULTISHIFT = "llvm.x86.avx512.pmultishift.qb.512"
NIBBLES = 0x0F0F0F0F
SIGN_BITS = 0x80808080
Q6K_SUB = 16  # Q6_K's weights per int8 sub-block scale
# Byte i of a lane-per-row vector comes from byte (i % 4)·16 + i // 4 of a k-major load.
TRANSPOSE_4X16 = [(i % 4) * LANES + i // 4 for i in range(4 * LANES)]
# Where the token count lives in x [d0, d1, K]: decode [1, 1, K], prefill [1, T, K],
# batched decode [B, 1, K]; the grouped GEMM's rows [R, K]; the gathered GEMVs' tokens [T, K].
TOKEN_AXES = {"one": None, "seq": 1, "batch": 0, "grouped": 0, "gathered": 0, "slots": 0}
STACKED = ("grouped", "gathered", "slots")  # token modes over stacked expert weights
SCALE_KINDS = ("group", "group+min", "k-quant", "q6k")
# Scratch of one task (accumulators, one word): TVM puts a small constant-size "global"
# allocation on the stack, where LLVM keeps it in registers, but serves every "local" one
# on the CPU with a TVMBackendAllocWorkspace call per task.
STACK = "global"


@dataclass(frozen=True)
class WeightFormat:
    """How a scheme's row-interleaved arrays encode a weight.

    bits: the stored low codes (4: nibbles in uint32 words; 8: int8). high_bits: the width
    of the extra top bits of 5-bit (1) and 6-bit (2) codes. scales: "group" (value =
    (code − zero)·s, s per 32), "group+min" (code·s + m), "k-quant" (Q4_K/Q5_K: 6-bit packed
    sub-block scales and minimums under float16 d and dmin per 256) or "q6k" (int8 scale per
    16 under a float16 d per 256, value = d·sc·(code − zero)). scale_dtype: of "group"
    scales."""

    bits: int
    zero: int
    scales: str
    high_bits: int = 0
    scale_dtype: str = "float16"

    def __post_init__(self):
        assert self.bits in (4, 8) and self.high_bits in (0, 1, 2) and self.scales in SCALE_KINDS
        assert self.bits == 4 or self.high_bits == 0

    @property
    def sub(self) -> int:
        """Weights per scale (the integer sums are kept per sub-block)."""
        return Q6K_SUB if self.scales == "q6k" else GROUP

    @property
    def with_min(self) -> bool:
        return self.scales in ("group+min", "k-quant")

    @property
    def block(self) -> int:
        """What the reduction axis must be a multiple of."""
        return SUPER if self.scales in ("k-quant", "q6k") else GROUP

    def arrays(self, n: int, k: int) -> list[tuple[tuple[int, ...], str]]:
        """(shape, dtype) of each stored array, in parameter order."""
        rows = n // LANES
        out = [((rows, k // 8, LANES), "uint32") if self.bits == 4 else ((rows, k, LANES), "int8")]
        if self.high_bits:
            out.append(((rows, k * self.high_bits // 32, LANES), "uint32"))
        groups, supers = (rows, k // GROUP, LANES), (rows, k // SUPER, LANES)
        if self.scales == "group":
            out.append((groups, self.scale_dtype))
        elif self.scales == "group+min":
            out += [(groups, self.scale_dtype)] * 2
        elif self.scales == "k-quant":
            out += [(supers, "uint32")] * 3 + [(supers, "float16")] * 2
        else:
            out += [((rows, k // Q6K_SUB, LANES), "int8"), (supers, "float16")]
        return out


def integer_dot(n: int, k: int, fmt: WeightFormat, residual: bool,
                tokens: str = "one", experts: int = 0) -> tirx.PrimFunc:
    """The kernel for an [n, k] weight stored as `fmt`. Parameters: the stored arrays
    (`fmt.arrays`), x, then (with `residual`) a tensor shaped like the output added to the
    result — o_proj's and down_proj's residual epilogue — and the output. `tokens`: "one"
    (x [1, 1, k], output [1, 1, n]), "seq" (x [1, T, k]) or "batch" (x [B, 1, k]), T and B
    symbolic (int64). "grouped": `experts` stacked weights (each array [experts, …]), x the
    grouped rows [R, k], then each block's expert [R / GROUP_ROWS] (int32) in the residual's
    place, and the output [R / GROUP_ROWS, GROUP_ROWS, n]. "gathered": stacked weights, x
    [T, k], each token's chosen experts [T, S] (int32) in the residual's place, the output
    [T, S, n]: slot (t, s) is token t times expert chosen[t, s]'s weight. "slots": the same
    with x [T, S, k], a row per slot."""
    assert n % LANES == 0 and k % fmt.block == 0
    grouped = tokens == "grouped"
    per_slot = tokens == "slots"
    assert (tokens in STACKED) == (experts > 0) and not (experts and residual)
    bits, zero, hb, sub = fmt.bits, fmt.zero, fmt.high_bits, fmt.sub
    has_high = hb > 0
    groups = k // GROUP
    subs = GROUP // sub  # scale sub-blocks per activation block
    steps = sub // 4  # vpdpbusd steps per sub-block, low (and top-bit) codes each
    high_steps = 8 // max(hb, 1)  # steps per top-bit word: it holds 32/hb codes, 4 a step
    token_axis = TOKEN_AXES[tokens]
    # One token streams its weights once: a task reads one row block, a single sequential
    # stream (two interleaved ones halved the bandwidth reached from DRAM on Zen 4). Many
    # tokens reuse each weight load, and two row blocks give more accumulators per load.
    # The gathered GEMVs (MoE decode) read 16 rows of one expert per row block: two per task
    # took a 64-expert gate call from 92 to 82 µs on the 2-core Xeon (four: 86 µs).
    per_task = 1 if token_axis is None else next(
        b for b in (ROW_BLOCKS, 1) if n // LANES % b == 0)
    tasks = n // LANES // per_task

    def chains(tile):
        """Independent integer accumulators per row block and token: one token has too few
        (`per_task`) to hide vpdpbusd's latency, so its steps alternate between two."""
        return 2 if tile == 1 and steps > 1 else 1

    def tokens_of(count):
        return 1 if token_axis is None else count

    def activation_offset(j, b):
        """Which element of its block byte b of activation word j holds."""
        return (j // 2) * 8 + j % 2 + 2 * b if bits == 4 else 4 * j + b

    def leading(block):
        """A row block's leading indices into a stored array: (block,), or (expert, block)
        for stacked experts."""
        return block if isinstance(block, tuple) else (block,)

    def row_block(expert, block):
        """Row block `block` of the weight, or of stacked expert `expert` (not None)."""
        return block if expert is None else (expert, block)

    def flat_block(block):
        """A row block's index among all (stacked) row blocks."""
        return block[0] * (n // LANES) + block[1] if isinstance(block, tuple) else block

    def weight_bytes(words, block, g, j):
        """The int8x64 operand of step j of group g: 4 codes of each of 16 rows."""
        if bits == 4:
            word = words[(*leading(block), g * (GROUP // 8) + j // 2, T.ramp(0, 1, LANES))]
            odd_codes = word >> T.broadcast(T.Cast("uint32", 4 * (j % 2)), LANES)
            return T.reinterpret("int8x64", odd_codes & T.broadcast(T.uint32(NIBBLES), LANES))
        base = (flat_block(block) * k + g * GROUP + 4 * j) * (LANES // 4)
        word = words[T.ramp(base, 1, LANES)] ^ T.broadcast(T.uint32(SIGN_BITS), LANES)
        return tirx.Shuffle([T.reinterpret("int8x64", word)], TRANSPOSE_4X16)

    def code_of(j, b):
        """Which code of its group of 32 byte b of step j multiplies (nibble order)."""
        return 8 * (j // 2) + 2 * b + j % 2

    def multishift_control(j):
        """Control bytes of step j, as uint32 lanes: byte b of row lane r selects the 8 bits
        of its 64-bit lane (rows r − r % 2 and r − r % 2 + 1) whose bits 4… are the top-bit
        field of code_of(j, b) in row r's word (offsets wrap around the lane)."""
        per_word = 32 // hb
        low_row = sum(((hb * (code_of(j, b) % per_word) - 4) % 64) << (8 * b) for b in range(4))
        odd_row = T.broadcast(T.uint32(0x20202020), LANES) * \
            (T.ramp(T.uint32(0), T.uint32(1), LANES) & T.broadcast(T.uint32(1), LANES))
        return T.broadcast(T.uint32(low_row), LANES) + odd_row

    def weight_bytes_with_high(arrays, block, g, j):
        """Step j of group g with the top bits joined: 4 whole codes of each of 16 rows."""
        word = arrays[1][(*leading(block), g * hb + j // high_steps, T.ramp(0, 1, LANES))]
        picked = T.reinterpret("uint32x16", T.call_llvm_pure_intrin(
            "int8x64", MULTISHIFT, T.reinterpret("int8x64", multishift_control(j)),
            T.reinterpret("int8x64", word)))
        top = picked & T.broadcast(T.uint32(((1 << hb) - 1) * 0x10101010), LANES)
        low = T.reinterpret("uint32x16", weight_bytes(arrays[0], block, g, j))
        return T.reinterpret("int8x64", low | top)

    def sub_scales(arrays, block, g, s):
        """(scale, minimum) of sub-block s of group g of row block `block` as float32x16
        (value = code·scale + minimum); minimum None for a zero-point scheme."""
        scales = arrays[1 + has_high:]
        rows = T.ramp(0, 1, LANES)
        if fmt.scales == "k-quant":  # d·sc and −dmin·m, sc and m 6-bit from the words
            words, d, dmin = scales[:3], scales[3], scales[4]
            block_of = g // SUBS
            sc, m = unpack_scale_min([w[(*leading(block), block_of, rows)] for w in words],
                                     g % SUBS)
            return (T.Cast("float32x16", d[(*leading(block), block_of, rows)]) *
                    T.Cast("float32x16", sc),
                    -T.Cast("float32x16", dmin[(*leading(block), block_of, rows)]) *
                    T.Cast("float32x16", m))
        if fmt.scales == "q6k":  # exact in float32: an 11-bit d times a 7-bit scale
            return (T.Cast("float32x16", scales[1][(*leading(block), g * GROUP // SUPER, rows)]) *
                    T.Cast("float32x16", scales[0][(*leading(block), g * subs + s, rows)]), None)
        scale = T.Cast("float32x16", scales[0][(*leading(block), g, rows)])
        if fmt.with_min:
            return scale, T.Cast("float32x16", scales[1][(*leading(block), g, rows)])
        return scale, None

    # fmt: off
    @T.macro
    def quantize_token(x, t, packed, xd, xs):
        """Token t of x (flat [M·k]) → int8 per block of 32, four codes per int32 in the
        order the weights' bytes come in (packed[t·8G + 8g + j]); xd = amax/127, xs = Σ codes
        of each scale sub-block."""
        for g in T.serial(groups):
            amax = T.alloc_buffer((1,), "float32", scope=STACK)
            total = T.alloc_buffer((1,), "int32", scope=STACK)
            word = T.alloc_buffer((1,), "int32", scope=STACK)
            amax[0] = T.float32(0)
            for j in T.serial(GROUP):
                amax[0] = T.max(amax[0], T.abs(x[t * k + g * GROUP + j]))
            xd[t * groups + g] = amax[0] * T.float32(1.0 / 127)
            inverse: T.let[T.float32] = T.if_then_else(
                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for s in T.serial(subs):
                total[0] = 0
                for jj in T.serial(steps):
                    word[0] = 0
                    for b in T.unroll(4):
                        q: T.let[T.int32] = T.Cast("int32", T.round(
                            x[t * k + g * GROUP + activation_offset(s * steps + jj, b)] * inverse))
                        total[0] = total[0] + q
                        word[0] = word[0] | ((q & 255) << (8 * b))
                    packed[(t * groups + g) * WORDS_PER_GROUP + s * steps + jj] = word[0]
                xs[(t * groups + g) * subs + s] = total[0]

    @T.macro
    def dot_steps(isum, unpacked, packed, operand, weights, task, first, tile, g, s, expert):
        """isum[rb, i] += the sub-block's `steps` dot products (operand: the weight bytes),
        step jj into chain jj % chains(tile)."""
        for jj in T.unroll(steps):
            for rb in T.unroll(per_task):
                unpacked[T.ramp(rb * LANES, 1, LANES)] = T.reinterpret(
                    "int32x16", operand(weights, row_block(expert, task * per_task + rb), g,
                                        s * steps + jj))
            for rb in T.unroll(per_task):
                for i in T.unroll(tile):
                    at: T.let[T.int32] = ((jj % chains(tile) * per_task + rb) * tile + i) * LANES
                    isum[T.ramp(at, 1, LANES)] = T.call_llvm_pure_intrin(
                        "int32x16", VNNI, isum[T.ramp(at, 1, LANES)],
                        T.reinterpret("int8x64", unpacked[T.ramp(rb * LANES, 1, LANES)]),
                        T.reinterpret("int8x64", T.broadcast(
                            packed[((first + i) * groups + g) * WORDS_PER_GROUP + s * steps + jj],
                            LANES)))

    @T.macro
    def dot_tile(codes, arrays, packed, xd, xs, out, res, task, first, tile, expert,
                 out_first):
        """out[out_first + i, task's rows] = Σ_sub s·xd·(Σ c·xq − z·xs) (+ res) for token
        first + i, i < tile: per_task row blocks × `tile` tokens of accumulators, each weight
        step unpacked once for the tile. `expert`: None, or the stacked expert whose weight
        this is."""
        acc = T.alloc_buffer((per_task * tile * LANES,), "float32", scope=STACK)
        isum = T.alloc_buffer((chains(tile) * per_task * tile * LANES,), "int32", scope=STACK)
        unpacked = T.alloc_buffer((per_task * LANES,), "int32", scope=STACK)
        scale = T.alloc_buffer((LANES,), "float32", scope=STACK)
        minimum = T.alloc_buffer((LANES,), "float32", scope=STACK)
        for a in T.unroll(per_task * tile):
            acc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
        for g in T.serial(groups):
            for s in T.unroll(subs):
                for a in T.unroll(chains(tile) * per_task * tile):
                    isum[T.ramp(a * LANES, 1, LANES)] = T.broadcast(0, LANES)
                if has_high:  # decided while parsing
                    dot_steps(isum, unpacked, packed, weight_bytes_with_high, arrays, task,
                              first, tile, g, s, expert)
                else:
                    dot_steps(isum, unpacked, packed, weight_bytes, codes, task, first, tile,
                              g, s, expert)
                for c in T.unroll(1, chains(tile)):
                    for a in T.unroll(per_task * tile):
                        isum[T.ramp(a * LANES, 1, LANES)] = isum[T.ramp(a * LANES, 1, LANES)] + \
                            isum[T.ramp((c * per_task * tile + a) * LANES, 1, LANES)]
                for rb in T.unroll(per_task):
                    # the row block's scales (and minimums) once, for every token of the tile
                    block: T.let[T.int32] = task * per_task + rb
                    scale[T.ramp(0, 1, LANES)] = \
                        sub_scales(arrays, row_block(expert, block), g, s)[0]
                    if fmt.with_min:  # decided while parsing
                        minimum[T.ramp(0, 1, LANES)] = \
                            sub_scales(arrays, row_block(expert, block), g, s)[1]
                    for i in T.unroll(tile):
                        a: T.let[T.int32] = (rb * tile + i) * LANES
                        step_scale = T.broadcast(xd[(first + i) * groups + g], LANES)
                        code_sum: T.let[T.int32] = xs[((first + i) * groups + g) * subs + s]
                        if fmt.with_min:  # decided while parsing
                            acc[T.ramp(a, 1, LANES)] = acc[T.ramp(a, 1, LANES)] + \
                                T.Cast("float32x16", isum[T.ramp(a, 1, LANES)]) * \
                                (scale[T.ramp(0, 1, LANES)] * step_scale) + \
                                (minimum[T.ramp(0, 1, LANES)] * step_scale) * \
                                T.broadcast(T.Cast("float32", code_sum), LANES)
                        else:
                            centred = isum[T.ramp(a, 1, LANES)] - T.broadcast(code_sum * zero,
                                                                              LANES)
                            acc[T.ramp(a, 1, LANES)] = acc[T.ramp(a, 1, LANES)] + \
                                T.Cast("float32x16", centred) * \
                                (scale[T.ramp(0, 1, LANES)] * step_scale)
        for rb in T.unroll(per_task):
            for i in T.unroll(tile):
                at: T.let[T.int64] = T.Cast("int64", out_first + i) * n + \
                    (task * per_task + rb) * LANES
                if residual:  # decided while parsing: `residual` is a Python bool
                    out[T.ramp(at, 1, LANES)] = \
                        acc[T.ramp((rb * tile + i) * LANES, 1, LANES)] + res[T.ramp(at, 1, LANES)]
                else:
                    out[T.ramp(at, 1, LANES)] = acc[T.ramp((rb * tile + i) * LANES, 1, LANES)]

    @T.macro
    def dot_all(codes, arrays, packed, xd, xs, out, res, count):
        for task in T.parallel(tasks):
            if token_axis is not None:  # decided while parsing: one token has no full tile
                for tile in T.serial(count // TOKEN_TILE):
                    dot_tile(codes, arrays, packed, xd, xs, out, res, task,
                             tile * TOKEN_TILE, TOKEN_TILE, None, tile * TOKEN_TILE)
            for t in T.serial(count % TOKEN_TILE):
                dot_tile(codes, arrays, packed, xd, xs, out, res, task,
                         count - count % TOKEN_TILE + t, 1, None, count - count % TOKEN_TILE + t)

    @T.macro
    def dot_grouped(codes, arrays, packed, xd, xs, out, chosen, count):
        """Every (block, task): the block's rows against its expert's row blocks, in tiles
        of TOKEN_TILE rows; an empty block's outputs zeroed."""
        blocks: T.let[T.int32] = T.Cast("int32", count // GROUP_ROWS)
        for item in T.parallel(blocks * tasks):
            # blocks innermost: an expert's blocks are consecutive, so its weight tile is
            # still in cache for its next block
            task: T.let[T.int32] = item // blocks
            b: T.let[T.int32] = item % blocks
            expert: T.let[T.int32] = chosen[b]
            if expert != EMPTY_BLOCK:
                for tile in T.serial(GROUP_ROWS // TOKEN_TILE):
                    first: T.let[T.int32] = b * GROUP_ROWS + tile * TOKEN_TILE
                    dot_tile(codes, arrays, packed, xd, xs, out, out, task, first, TOKEN_TILE,
                             expert, first)
            else:
                for r in T.serial(GROUP_ROWS):
                    for rb in T.unroll(per_task):
                        at: T.let[T.int64] = T.Cast("int64", b * GROUP_ROWS + r) * n + \
                            (task * per_task + rb) * LANES
                        out[T.ramp(at, 1, LANES)] = T.broadcast(T.float32(0), LANES)

    def activation_row(pair, slots):
        """The quantized activation row slot `pair` multiplies: its own, or its token's."""
        return pair if per_slot else pair // slots

    def activation_rows(count, slots):
        """Activation rows of `count` tokens: one per slot, or one per token."""
        return count * slots if per_slot else count

    @T.macro
    def dot_gathered(codes, arrays, packed, xd, xs, out, chosen, count, slots):
        """Every (task, token, slot): the task's row blocks of the slot's expert against
        the slot's activations, written to output row token · slots + slot."""
        for item in T.parallel(tasks * T.Cast("int32", count) * slots):
            task: T.let[T.int32] = item // (T.Cast("int32", count) * slots)
            pair: T.let[T.int32] = item % (T.Cast("int32", count) * slots)
            expert: T.let[T.int32] = chosen[pair]
            dot_tile(codes, arrays, packed, xd, xs, out, out, task,
                     activation_row(pair, slots), 1, expert, pair)

    @T.macro
    def quantize_then_dot(arrays, rows, quantize_rows, quantize_args, dot, dot_args):
        """Every mode's frame: scratch for `rows` activation rows, `quantize_rows(packed, xd,
        xs, *quantize_args)` fills it, then `dot(codes, arrays, packed, xd, xs, *dot_args)`
        with the codes as the dot products read them (8-bit ones as uint32 words, 64 bytes
        per load)."""
        packed = T.alloc_buffer((rows * groups * WORDS_PER_GROUP,), "int32")
        xd = T.alloc_buffer((rows * groups,), "float32")
        xs = T.alloc_buffer((rows * groups * subs,), "int32")
        quantize_rows(packed, xd, xs, *quantize_args)
        if bits == 8:  # decided while parsing
            words = T.decl_buffer((max(experts, 1) * n * k // 4,), "uint32",
                                  data=arrays[0].data)
            dot(words, arrays, packed, xd, xs, *dot_args)
        else:
            dot(arrays[0], arrays, packed, xd, xs, *dot_args)

    @T.macro
    def quantize_tokens(packed, xd, xs, x, count):
        """`count` rows of x, in parallel (one token: no thread-pool launch)."""
        if token_axis is None:  # decided while parsing
            quantize_token(x, 0, packed, xd, xs)
        else:
            for t in T.parallel(count):
                quantize_token(x, t, packed, xd, xs)

    @T.macro
    def quantize_blocks(packed, xd, xs, x, chosen, count):
        """The grouped rows of x but those of empty blocks, in parallel."""
        for t in T.parallel(count):
            if chosen[t // GROUP_ROWS] != EMPTY_BLOCK:
                quantize_token(x, t, packed, xd, xs)

    @T.macro
    def run(arrays, x, res, out, count):
        """`count` tokens: x, res, out are flat views."""
        quantize_then_dot(arrays, count, quantize_tokens, (x, count), dot_all,
                          (out, res, count))

    @T.macro
    def run_grouped(arrays, x, chosen, out, count):
        """`count` grouped rows (flat x and out) in blocks of GROUP_ROWS; chosen: each
        block's expert. Rows of empty blocks are not quantized."""
        quantize_then_dot(arrays, count, quantize_blocks, (x, chosen, count), dot_grouped,
                          (out, chosen, count))

    @T.macro
    def body_gathered(arrays, var_x, var_chosen, var_out):
        count = T.int64()
        slots = T.int64()
        chosen = T.match_buffer(var_chosen, (count, slots), "int32")
        out = T.match_buffer(var_out, (count, slots, T.int64(n)), "float32")
        if per_slot:  # decided while parsing
            x = T.match_buffer(var_x, (count, slots, T.int64(k)), "float32")
        else:
            x = T.match_buffer(var_x, (count, T.int64(k)), "float32")
        flat_x = T.decl_buffer((activation_rows(count, slots) * k,), "float32", data=x.data)
        flat_chosen = T.decl_buffer((count * slots,), "int32", data=chosen.data)
        flat_out = T.decl_buffer((count * slots * n,), "float32", data=out.data)
        quantize_then_dot(arrays, activation_rows(count, slots), quantize_tokens,
                          (flat_x, activation_rows(count, slots)), dot_gathered,
                          (flat_out, flat_chosen, count, T.Cast("int32", slots)))

    @T.macro
    def body_grouped(arrays, var_x, var_chosen, var_out):
        count = T.int64()
        x = T.match_buffer(var_x, (count, T.int64(k)), "float32")
        chosen = T.match_buffer(var_chosen, (count // GROUP_ROWS,), "int32")
        out = T.match_buffer(var_out, (count // GROUP_ROWS, T.int64(GROUP_ROWS), T.int64(n)),
                             "float32")
        flat_x = T.decl_buffer((count * k,), "float32", data=x.data)
        flat_out = T.decl_buffer((count * n,), "float32", data=out.data)
        run_grouped(arrays, flat_x, chosen, flat_out, count)

    @T.macro
    def body(arrays, var_x, var_res, var_out):
        count = T.int64()
        if token_axis is None:
            x = T.match_buffer(var_x, (1, 1, k), "float32")
            out = T.match_buffer(var_out, (1, 1, n), "float32")
        elif token_axis == 1:
            x = T.match_buffer(var_x, (T.int64(1), count, T.int64(k)), "float32")
            out = T.match_buffer(var_out, (T.int64(1), count, T.int64(n)), "float32")
        else:
            x = T.match_buffer(var_x, (count, T.int64(1), T.int64(k)), "float32")
            out = T.match_buffer(var_out, (count, T.int64(1), T.int64(n)), "float32")
        if residual:  # decided while parsing
            res = T.match_buffer(var_res, out.shape, "float32")
        flat_x = T.decl_buffer((tokens_of(count) * k,), "float32", data=x.data)
        flat_out = T.decl_buffer((tokens_of(count) * n,), "float32", data=out.data)
        if residual:
            flat_res = T.decl_buffer((tokens_of(count) * n,), "float32", data=res.data)
            run(arrays, flat_x, flat_res, flat_out, tokens_of(count))
        else:  # the output stands in for the residual (never read)
            run(arrays, flat_x, flat_out, flat_out, tokens_of(count))
    # fmt: on

    if experts:  # the experts chosen take the residual's place among the parameters
        return _signature([((experts, *shape), dtype) for shape, dtype in fmt.arrays(n, k)],
                          True, body_grouped if grouped else body_gathered)
    return _signature(fmt.arrays(n, k), residual, body)


ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True}


def _signature(arrays, residual: bool, body) -> tirx.PrimFunc:
    """The PrimFunc (stored arrays…, x[, residual], out) around `body`; TVMScript has no
    variadic parameters, so there is one definition per array count (2, 3, 4, 6, 7)."""
    A = [T.Buffer(shape, dtype) for shape, dtype in arrays]  # noqa: N806 (annotations)
    # Only the variant asked for is parsed (parsing is most of integer_dot's time).
    # fmt: off
    if len(A) == 2 and residual:
        @T.prim_func(private=True)
        def two_residual(a0: A[0], a1: A[1], var_x: T.handle, var_res: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1), var_x, var_res, var_out)
        return two_residual
    if len(A) == 2:
        @T.prim_func(private=True)
        def two(a0: A[0], a1: A[1], var_x: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1), var_x, None, var_out)
        return two
    if len(A) == 3 and residual:
        @T.prim_func(private=True)
        def three_residual(a0: A[0], a1: A[1], a2: A[2], var_x: T.handle, var_res: T.handle,
                           var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2), var_x, var_res, var_out)
        return three_residual
    if len(A) == 3:
        @T.prim_func(private=True)
        def three(a0: A[0], a1: A[1], a2: A[2], var_x: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2), var_x, None, var_out)
        return three
    if len(A) == 4 and residual:
        @T.prim_func(private=True)
        def four_residual(a0: A[0], a1: A[1], a2: A[2], a3: A[3], var_x: T.handle,
                          var_res: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2, a3), var_x, var_res, var_out)
        return four_residual
    if len(A) == 4:
        @T.prim_func(private=True)
        def four(a0: A[0], a1: A[1], a2: A[2], a3: A[3], var_x: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2, a3), var_x, None, var_out)
        return four
    if len(A) == 6 and residual:
        @T.prim_func(private=True)
        def six_residual(a0: A[0], a1: A[1], a2: A[2], a3: A[3], a4: A[4], a5: A[5],
                         var_x: T.handle, var_res: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2, a3, a4, a5), var_x, var_res, var_out)
        return six_residual
    if len(A) == 6:
        @T.prim_func(private=True)
        def six(a0: A[0], a1: A[1], a2: A[2], a3: A[3], a4: A[4], a5: A[5], var_x: T.handle,
                var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2, a3, a4, a5), var_x, None, var_out)
        return six
    assert len(A) == 7
    if residual:
        @T.prim_func(private=True)
        def seven_residual(a0: A[0], a1: A[1], a2: A[2], a3: A[3], a4: A[4], a5: A[5],
                           a6: A[6], var_x: T.handle, var_res: T.handle, var_out: T.handle):
            T.func_attr(ATTRS)
            body((a0, a1, a2, a3, a4, a5, a6), var_x, var_res, var_out)
        return seven_residual

    @T.prim_func(private=True)
    def seven(a0: A[0], a1: A[1], a2: A[2], a3: A[3], a4: A[4], a5: A[5], a6: A[6],
              var_x: T.handle, var_out: T.handle):
        T.func_attr(ATTRS)
        body((a0, a1, a2, a3, a4, a5, a6), var_x, None, var_out)
    return seven
    # fmt: on
