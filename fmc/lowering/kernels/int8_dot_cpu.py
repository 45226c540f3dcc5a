"""Integer-dot matmuls for the CPU: y = W·x with 4- or 8-bit weights and int8 activations,
for one token (decode GEMV) or many (prefill GEMM).

The float path decodes every code to float32 and takes one FMA per code, row and token. These
kernels do what llama.cpp does on x86: quantize each token's activations once per call to
int8 in blocks of 32 (scale amax/127, plus each block's sum of codes), multiply the weights'
codes with them in integer arithmetic — `vpdpbusd` (AVX-512 VNNI) multiplies 4 unsigned bytes
by 4 signed bytes and adds them into an int32 lane — and apply the float scales once per
group:

    y[t, n] = Σ_g s[n, g] · xd[t, g] · (Σ_{k∈g} c[n, k] · xq[t, k] − z · Σ_{k∈g} xq[t, k])

for value = (c − z)·s (q4f16, q4f32: z = 7; q4_0: z = 8; q8f16: the signed code c − 128 is
stored, read as the unsigned byte c, z = 128), and for value = c·s + m (q4_1; q4k, whose
s = d·sc and m = −dmin·m' come from 6-bit sub-block scales)

    y[t, n] = Σ_g xd[t, g] · (s[n, g] · Σ_{k∈g} c[n, k] · xq[t, k] + m[n, g] · Σ_{k∈g} xq[t, k]).

Weights are the CPU's row-interleaved layout (rows innermost in blocks of 16), so lane r of
the int32 accumulator is row r:
- 4-bit: [N/16, K/8, 16] uint32 words. One 64-byte load holds a word of each of 16 rows;
  `w & 0x0F0F0F0F` gives codes 0, 2, 4, 6 as bytes and `(w >> 4) & 0x0F0F0F0F` codes
  1, 3, 5, 7, and the activation bytes are packed in that order, so no shuffle is needed.
- 8-bit: [N/16, K, 16] int8. One 64-byte load holds 4 consecutive k of 16 rows, k-major;
  a byte shuffle (`vpermb` with AVX-512 VBMI) transposes it to 4 k per row lane, and an xor
  with 0x80 makes the signed codes unsigned.

Many tokens: each task (two row blocks) walks the tokens in tiles of TOKEN_TILE, so a
weight word is loaded and unpacked once per tile and feeds TOKEN_TILE dot products; the
activations are quantized first, in parallel over tokens.

The integer sums are exact; the result differs from the float path by the rounding of the
activations to int8 only (the tolerance is in docs/quantization.md)."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from fmc.quant.kquant import SUBS, SUPER, unpack_scale_min

LANES = 16  # int32/float32 lanes of a 512-bit vector = weight rows per row block
GROUP = 32  # weights per scale group; activation blocks match it
WORDS_PER_GROUP = GROUP // 4  # vpdpbusd steps per group and row block (4 bytes per lane)
ROW_BLOCKS = 2  # row blocks per task: independent accumulator chains
TOKEN_TILE = 4  # tokens per weight load in a GEMM (2 row blocks × 4 tokens accumulators)
VNNI = "llvm.x86.avx512.vpdpbusd.512"
NIBBLES = 0x0F0F0F0F
SIGN_BITS = 0x80808080
# Byte i of a lane-per-row vector comes from byte (i % 4)·16 + i // 4 of a k-major load.
TRANSPOSE_4X16 = [(i % 4) * LANES + i // 4 for i in range(4 * LANES)]
# Where the token count lives in x [d0, d1, K]: decode [1, 1, K], prefill [1, T, K],
# batched decode [B, 1, K].
TOKEN_AXES = {"one": None, "seq": 1, "batch": 0}


def integer_dot(n: int, k: int, bits: int, zero: int, scale_dtype: str, residual: bool,
                with_min: bool = False, kquant: bool = False,
                tokens: str = "one") -> tirx.PrimFunc:
    """The kernel for an [n, k] weight with `bits`-bit codes (4 or 8). Parameters: codes
    (4-bit: [n/16, k/8, 16] uint32; 8-bit: [n/16, k, 16] int8), scales [n/16, k/32, 16],
    (with `with_min`: the minimums, same shape; with `kquant` instead Q4_K's three packed
    scale-word arrays, d and dmin, each [n/16, k/256, 16]), x, then (with `residual`) a
    tensor shaped like the output added to the result — o_proj's and down_proj's residual
    epilogue — and the output. `tokens`: "one" (x [1, 1, k], output [1, 1, n]), "seq"
    (x [1, T, k]) or "batch" (x [B, 1, k]), T and B symbolic (int64)."""
    assert n % LANES == 0 and k % GROUP == 0 and bits in (4, 8)
    assert not kquant or (bits == 4 and k % SUPER == 0)
    groups = k // GROUP
    per_task = next(b for b in (ROW_BLOCKS, 1) if n // LANES % b == 0)
    tasks = n // LANES // per_task
    codes_shape, codes_dtype = ((n // LANES, k // 8, LANES), "uint32") if bits == 4 \
        else ((n // LANES, k, LANES), "int8")
    token_axis = TOKEN_AXES[tokens]

    def tokens_of(count):
        return 1 if token_axis is None else count

    def activation_offset(j, b):
        """Which element of its block byte b of activation word j holds."""
        return (j // 2) * 8 + j % 2 + 2 * b if bits == 4 else 4 * j + b

    def weight_bytes(words, block, g, j):
        """The int8x64 operand of step j of group g: 4 codes of each of 16 rows."""
        if bits == 4:
            word = words[block, g * (GROUP // 8) + j // 2, T.ramp(0, 1, LANES)]
            odd_codes = word >> T.broadcast(T.Cast("uint32", 4 * (j % 2)), LANES)
            return T.reinterpret("int8x64", odd_codes & T.broadcast(T.uint32(NIBBLES), LANES))
        base = (block * k + g * GROUP + 4 * j) * (LANES // 4)
        word = words[T.ramp(base, 1, LANES)] ^ T.broadcast(T.uint32(SIGN_BITS), LANES)
        return tirx.Shuffle([T.reinterpret("int8x64", word)], TRANSPOSE_4X16)

    def group_scales(parts, block, g):
        """(scale, minimum) of group g of row block `block` as float32x16 (value = code·scale
        + minimum); minimum None for a zero-point scheme."""
        if len(parts) == 5:  # Q4_K: d·sc and −dmin·m, sc and m 6-bit from the words
            words, d, dmin = parts[:3], parts[3], parts[4]
            block_of = g // SUBS
            sc, m = unpack_scale_min([w[block, block_of, T.ramp(0, 1, LANES)] for w in words],
                                     g % SUBS)
            return (T.Cast("float32x16", d[block, block_of, T.ramp(0, 1, LANES)]) *
                    T.Cast("float32x16", sc),
                    -T.Cast("float32x16", dmin[block, block_of, T.ramp(0, 1, LANES)]) *
                    T.Cast("float32x16", m))
        scale = T.Cast("float32x16", parts[0][block, g, T.ramp(0, 1, LANES)])
        if len(parts) == 2:  # with minimums
            return scale, T.Cast("float32x16", parts[1][block, g, T.ramp(0, 1, LANES)])
        return scale, None

    # fmt: off
    @T.macro
    def quantize_token(x, t, packed, xd, xs):
        """Token t of x (flat [M·k]) → int8 per block of 32, four codes per int32 in the
        order the weights' bytes come in (packed[t·8G + 8g + j]); xd = amax/127, xs = Σ
        codes of the block."""
        for g in T.serial(groups):
            amax = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "int32", scope="local")
            amax[0] = T.float32(0)
            for j in T.serial(GROUP):
                amax[0] = T.max(amax[0], T.abs(x[t * k + g * GROUP + j]))
            xd[t * groups + g] = amax[0] * T.float32(1.0 / 127)
            inverse: T.let[T.float32] = T.if_then_else(
                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            total[0] = 0
            for j in T.serial(WORDS_PER_GROUP):
                word = T.alloc_buffer((1,), "int32", scope="local")
                word[0] = 0
                for b in T.unroll(4):
                    q: T.let[T.int32] = T.Cast("int32", T.round(
                        x[t * k + g * GROUP + activation_offset(j, b)] * inverse))
                    total[0] = total[0] + q
                    word[0] = word[0] | ((q & 255) << (8 * b))
                packed[(t * groups + g) * WORDS_PER_GROUP + j] = word[0]
            xs[t * groups + g] = total[0]

    @T.macro
    def dot_tile(codes, parts, packed, xd, xs, out, res, task, first, tile):
        """out[first … first + tile − 1, task's rows] = Σ_g s·xd·(Σ c·xq − z·xs) (+ res):
        per_task row blocks × `tile` tokens of accumulators, each weight step unpacked
        once for the tile."""
        acc = T.alloc_buffer((per_task * tile * LANES,), "float32", scope="local")
        isum = T.alloc_buffer((per_task * tile * LANES,), "int32", scope="local")
        unpacked = T.alloc_buffer((per_task * LANES,), "int32", scope="local")
        for a in T.unroll(per_task * tile):
            acc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
        for g in T.serial(groups):
            for a in T.unroll(per_task * tile):
                isum[T.ramp(a * LANES, 1, LANES)] = T.broadcast(0, LANES)
            for j in T.unroll(WORDS_PER_GROUP):
                for rb in T.unroll(per_task):
                    unpacked[T.ramp(rb * LANES, 1, LANES)] = T.reinterpret(
                        "int32x16", weight_bytes(codes, task * per_task + rb, g, j))
                for rb in T.unroll(per_task):
                    for i in T.unroll(tile):
                        isum[T.ramp((rb * tile + i) * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, isum[T.ramp((rb * tile + i) * LANES, 1, LANES)],
                            T.reinterpret("int8x64", unpacked[T.ramp(rb * LANES, 1, LANES)]),
                            T.reinterpret("int8x64", T.broadcast(
                                packed[((first + i) * groups + g) * WORDS_PER_GROUP + j],
                                LANES)))
            for rb in T.unroll(per_task):
                for i in T.unroll(tile):
                    block: T.let[T.int32] = task * per_task + rb
                    a: T.let[T.int32] = (rb * tile + i) * LANES
                    step_scale = T.broadcast(xd[(first + i) * groups + g], LANES)
                    if with_min:  # decided while parsing
                        acc[T.ramp(a, 1, LANES)] = acc[T.ramp(a, 1, LANES)] + \
                            T.Cast("float32x16", isum[T.ramp(a, 1, LANES)]) * \
                            (group_scales(parts, block, g)[0] * step_scale) + \
                            (group_scales(parts, block, g)[1] * step_scale) * \
                            T.broadcast(T.Cast("float32", xs[(first + i) * groups + g]), LANES)
                    else:
                        centred = isum[T.ramp(a, 1, LANES)] - T.broadcast(
                            xs[(first + i) * groups + g] * zero, LANES)
                        acc[T.ramp(a, 1, LANES)] = acc[T.ramp(a, 1, LANES)] + \
                            T.Cast("float32x16", centred) * \
                            (group_scales(parts, block, g)[0] * step_scale)
        for rb in T.unroll(per_task):
            for i in T.unroll(tile):
                at: T.let[T.int64] = T.Cast("int64", first + i) * n + \
                    (task * per_task + rb) * LANES
                if residual:  # decided while parsing: `residual` is a Python bool
                    out[T.ramp(at, 1, LANES)] = \
                        acc[T.ramp((rb * tile + i) * LANES, 1, LANES)] + res[T.ramp(at, 1, LANES)]
                else:
                    out[T.ramp(at, 1, LANES)] = acc[T.ramp((rb * tile + i) * LANES, 1, LANES)]

    @T.macro
    def dot_all(words, parts, packed, xd, xs, out, res, count):
        for task in T.parallel(tasks):
            if token_axis is not None:  # decided while parsing: one token has no full tile
                for tile in T.serial(count // TOKEN_TILE):
                    dot_tile(words, parts, packed, xd, xs, out, res, task, tile * TOKEN_TILE,
                             TOKEN_TILE)
            for t in T.serial(count % TOKEN_TILE):
                dot_tile(words, parts, packed, xd, xs, out, res, task,
                         count - count % TOKEN_TILE + t, 1)

    @T.macro
    def run(codes, parts, x, res, out, count):
        """`count` tokens: x, res, out are flat views."""
        packed = T.alloc_buffer((count * groups * WORDS_PER_GROUP,), "int32")
        xd = T.alloc_buffer((count * groups,), "float32")
        xs = T.alloc_buffer((count * groups,), "int32")
        if token_axis is None:  # decided while parsing: one token, no thread-pool launch
            quantize_token(x, 0, packed, xd, xs)
        else:
            for t in T.parallel(count):
                quantize_token(x, t, packed, xd, xs)
        if bits == 8:  # the 8-bit codes read as uint32 words, 64 bytes per load
            words = T.decl_buffer((n * k // 4,), "uint32", data=codes.data)
            dot_all(words, parts, packed, xd, xs, out, res, count)
        else:
            dot_all(codes, parts, packed, xd, xs, out, res, count)

    @T.macro
    def body(codes, parts, var_x, var_res, var_out):
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
            run(codes, parts, flat_x, flat_res, flat_out, tokens_of(count))
        else:  # the output stands in for the residual (never read)
            run(codes, parts, flat_x, flat_out, flat_out, tokens_of(count))
    # fmt: on

    shape = (n // LANES, groups, LANES)
    supers = (n // LANES, k // SUPER, LANES)
    # Only the variant asked for is parsed (parsing is most of this function's time).
    if kquant and residual:
        @T.prim_func(private=True)
        def k_quant_residual(
                codes: T.Buffer(codes_shape, codes_dtype), words0: T.Buffer(supers, "uint32"),
                words1: T.Buffer(supers, "uint32"), words2: T.Buffer(supers, "uint32"),
                d: T.Buffer(supers, "float16"), dmin: T.Buffer(supers, "float16"),
                var_x: T.handle, var_res: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(codes, (words0, words1, words2, d, dmin), var_x, var_res, var_out)
        return k_quant_residual
    if kquant:
        @T.prim_func(private=True)
        def k_quant(codes: T.Buffer(codes_shape, codes_dtype), words0: T.Buffer(supers, "uint32"),
                    words1: T.Buffer(supers, "uint32"), words2: T.Buffer(supers, "uint32"),
                    d: T.Buffer(supers, "float16"), dmin: T.Buffer(supers, "float16"),
                    var_x: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(codes, (words0, words1, words2, d, dmin), var_x, None, var_out)
        return k_quant
    if with_min and residual:
        @T.prim_func(private=True)
        def affine_residual(
                codes: T.Buffer(codes_shape, codes_dtype), scales: T.Buffer(shape, scale_dtype),
                mins: T.Buffer(shape, scale_dtype), var_x: T.handle, var_res: T.handle,
                var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(codes, (scales, mins), var_x, var_res, var_out)
        return affine_residual
    if with_min:
        @T.prim_func(private=True)
        def affine(codes: T.Buffer(codes_shape, codes_dtype),
                   scales: T.Buffer(shape, scale_dtype), mins: T.Buffer(shape, scale_dtype),
                   var_x: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(codes, (scales, mins), var_x, None, var_out)
        return affine
    if residual:
        @T.prim_func(private=True)
        def plus_residual(codes: T.Buffer(codes_shape, codes_dtype),
                          scales: T.Buffer(shape, scale_dtype), var_x: T.handle,
                          var_res: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(codes, (scales,), var_x, var_res, var_out)
        return plus_residual

    @T.prim_func(private=True)
    def plain(codes: T.Buffer(codes_shape, codes_dtype), scales: T.Buffer(shape, scale_dtype),
              var_x: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        body(codes, (scales,), var_x, None, var_out)
    return plain
