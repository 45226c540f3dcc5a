"""Integer-dot decode GEMV for the CPU: y = W·x with 4- or 8-bit weights and int8
activations.

The float path decodes every code to float32 and takes one FMA per code and row. This kernel
does what llama.cpp does on x86: quantize the activation vector once per call to int8 in
blocks of 32 (scale amax/127, plus each block's sum of codes), multiply the weights' codes
with it in integer arithmetic — `vpdpbusd` (AVX-512 VNNI) multiplies 4 unsigned bytes by 4
signed bytes and adds them into an int32 lane — and apply the float scales once per group:

    y[n] = Σ_g s[n, g] · xd[g] · (Σ_{k∈g} c[n, k] · xq[k] − z · Σ_{k∈g} xq[k])

for value = (c − z)·s (q4f16, q4f32: z = 7; q4_0: z = 8; q8f16: the signed code c − 128 is
stored, read as the unsigned byte c, z = 128), and for value = c·s + m (q4_1)

    y[n] = Σ_g xd[g] · (s[n, g] · Σ_{k∈g} c[n, k] · xq[k] + m[n, g] · Σ_{k∈g} xq[k]).

Weights are the CPU's row-interleaved layout (rows innermost in blocks of 16), so lane r of
the int32 accumulator is row r:
- 4-bit: [N/16, K/8, 16] uint32 words. One 64-byte load holds a word of each of 16 rows;
  `w & 0x0F0F0F0F` gives codes 0, 2, 4, 6 as bytes and `(w >> 4) & 0x0F0F0F0F` codes
  1, 3, 5, 7, and the activation bytes are packed in that order, so no shuffle is needed.
- 8-bit: [N/16, K, 16] int8. One 64-byte load holds 4 consecutive k of 16 rows, k-major;
  a byte shuffle (`vpermb` with AVX-512 VBMI) transposes it to 4 k per row lane, and an xor
  with 0x80 makes the signed codes unsigned.

The integer sums are exact; the result differs from the float path by the rounding of the
activations to int8 only (the tolerance is in docs/quantization.md)."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # int32/float32 lanes of a 512-bit vector = weight rows per row block
GROUP = 32  # weights per scale group; activation blocks match it
WORDS_PER_GROUP = GROUP // 4  # vpdpbusd steps per group and row block (4 bytes per lane)
ROW_BLOCKS = 2  # row blocks per task: independent accumulator chains
VNNI = "llvm.x86.avx512.vpdpbusd.512"
NIBBLES = 0x0F0F0F0F
SIGN_BITS = 0x80808080
# Byte i of a lane-per-row vector comes from byte (i % 4)·16 + i // 4 of a k-major load.
TRANSPOSE_4X16 = [(i % 4) * LANES + i // 4 for i in range(4 * LANES)]
SUPER, SUBS = 256, 8  # Q4_K: super-blocks of 256 weights, 8 groups each


def gemv(n: int, k: int, bits: int, zero: int, scale_dtype: str, residual: bool,
         with_min: bool = False, kquant: bool = False) -> tirx.PrimFunc:
    """The kernel for an [n, k] weight with `bits`-bit codes (4 or 8). Parameters: codes
    (4-bit: [n/16, k/8, 16] uint32; 8-bit: [n/16, k, 16] int8), scales [n/16, k/32, 16],
    (with `with_min`: the minimums, same shape; with `kquant` instead Q4_K's three packed
    scale-word arrays, d and dmin, each [n/16, k/256, 16]), x [1, 1, k], then (with
    `residual`) a [1, 1, n] tensor added to the result — o_proj's and down_proj's residual
    epilogue — and the output [1, 1, n]."""
    assert n % LANES == 0 and k % GROUP == 0 and bits in (4, 8)
    assert not kquant or (bits == 4 and k % SUPER == 0)
    groups = k // GROUP
    per_task = next(b for b in (ROW_BLOCKS, 1) if n // LANES % b == 0)
    tasks = n // LANES // per_task
    codes_shape, codes_dtype = ((n // LANES, k // 8, LANES), "uint32") if bits == 4 \
        else ((n // LANES, k, LANES), "int8")

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
        if kquant:  # Q4_K: d·sc and −dmin·m, sc and m 6-bit from the super-block's words
            words, d, dmin = parts[:3], parts[3], parts[4]
            block_of: T.let[T.int32] = g // SUBS
            shift = T.broadcast(T.Cast("uint32", g % 4 * 8), LANES)
            byte = T.broadcast(T.uint32(255), LANES)
            low, mid, top = ((w[block, block_of, T.ramp(0, 1, LANES)] >> shift) & byte
                             for w in words)
            six_bits = T.broadcast(T.uint32(63), LANES)
            four_bits = T.broadcast(T.uint32(15), LANES)
            by_six, by_four = T.broadcast(T.uint32(6), LANES), T.broadcast(T.uint32(4), LANES)
            first_half = T.broadcast(g % SUBS < 4, LANES)
            sc = T.Select(first_half, low & six_bits,
                          (top & four_bits) | ((low >> by_six) << by_four))
            m = T.Select(first_half, mid & six_bits,
                         (top >> by_four) | ((mid >> by_six) << by_four))
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
    def quantize_activation(x, packed, xd, xs):
        """x → int8 per block of 32, four codes per int32 in the order the weights' bytes
        come in (packed[8g + j]); xd = amax/127, xs = Σ codes of the block."""
        for g in T.serial(groups):
            amax = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "int32", scope="local")
            amax[0] = T.float32(0)
            for j in T.serial(GROUP):
                amax[0] = T.max(amax[0], T.abs(x[0, 0, g * GROUP + j]))
            xd[g] = amax[0] * T.float32(1.0 / 127)
            inverse: T.let[T.float32] = T.if_then_else(
                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            total[0] = 0
            for j in T.serial(WORDS_PER_GROUP):
                word = T.alloc_buffer((1,), "int32", scope="local")
                word[0] = 0
                for b in T.unroll(4):
                    q: T.let[T.int32] = T.Cast("int32", T.round(
                        x[0, 0, g * GROUP + activation_offset(j, b)] * inverse))
                    total[0] = total[0] + q
                    word[0] = word[0] | ((q & 255) << (8 * b))
                packed[g * WORDS_PER_GROUP + j] = word[0]
            xs[g] = total[0]

    @T.macro
    def dot_rows(codes, parts, packed, xd, xs, out, res):
        """out[task's rows] = Σ_g s·xd·(Σ c·xq − z·xs) (+ res), ROW_BLOCKS row blocks at
        once."""
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((per_task * LANES,), "float32", scope="local")
            isum = T.alloc_buffer((per_task * LANES,), "int32", scope="local")
            for rb in T.unroll(per_task):
                acc[T.ramp(rb * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for g in T.serial(groups):
                for rb in T.unroll(per_task):
                    isum[T.ramp(rb * LANES, 1, LANES)] = T.broadcast(0, LANES)
                for j in T.unroll(WORDS_PER_GROUP):
                    for rb in T.unroll(per_task):
                        isum[T.ramp(rb * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, isum[T.ramp(rb * LANES, 1, LANES)],
                            weight_bytes(codes, task * per_task + rb, g, j),
                            T.reinterpret("int8x64", T.broadcast(
                                packed[g * WORDS_PER_GROUP + j], LANES)))
                for rb in T.unroll(per_task):
                    block: T.let[T.int32] = task * per_task + rb
                    step_scale = T.broadcast(xd[g], LANES)
                    if with_min:  # decided while parsing
                        acc[T.ramp(rb * LANES, 1, LANES)] = \
                            acc[T.ramp(rb * LANES, 1, LANES)] + \
                            T.Cast("float32x16", isum[T.ramp(rb * LANES, 1, LANES)]) * \
                            (group_scales(parts, block, g)[0] * step_scale) + \
                            (group_scales(parts, block, g)[1] * step_scale) * \
                            T.broadcast(T.Cast("float32", xs[g]), LANES)
                    else:
                        centred = isum[T.ramp(rb * LANES, 1, LANES)] - T.broadcast(
                            xs[g] * zero, LANES)
                        acc[T.ramp(rb * LANES, 1, LANES)] = \
                            acc[T.ramp(rb * LANES, 1, LANES)] + \
                            T.Cast("float32x16", centred) * \
                            (group_scales(parts, block, g)[0] * step_scale)
            for rb in T.unroll(per_task):
                rows: T.let[T.int32] = (task * per_task + rb) * LANES
                if residual:  # decided while parsing: `residual` is a Python bool
                    out[0, 0, T.ramp(rows, 1, LANES)] = acc[T.ramp(rb * LANES, 1, LANES)] + \
                        res[0, 0, T.ramp(rows, 1, LANES)]
                else:
                    out[0, 0, T.ramp(rows, 1, LANES)] = acc[T.ramp(rb * LANES, 1, LANES)]

    shape = (n // LANES, groups, LANES)

    @T.macro
    def run(codes, parts, x, res, out):
        packed = T.alloc_buffer((groups * WORDS_PER_GROUP,), "int32")
        xd = T.alloc_buffer((groups,), "float32")
        xs = T.alloc_buffer((groups,), "int32")
        quantize_activation(x, packed, xd, xs)
        if bits == 4:  # decided while parsing
            dot_rows(codes, parts, packed, xd, xs, out, res)
        else:  # the 8-bit codes read as uint32 words, 64 bytes per load
            words = T.decl_buffer((n * k // 4,), "uint32", data=codes.data)
            dot_rows(words, parts, packed, xd, xs, out, res)

    supers = (n // LANES, k // SUPER, LANES)
    x_shape, out_shape = (1, 1, k), (1, 1, n)
    # Only the variant asked for is parsed (parsing is most of this function's time).
    if kquant and residual:
        @T.prim_func(private=True)
        def k_quant_residual(
                codes: T.Buffer(codes_shape, codes_dtype), words0: T.Buffer(supers, "uint32"),
                words1: T.Buffer(supers, "uint32"), words2: T.Buffer(supers, "uint32"),
                d: T.Buffer(supers, "float16"), dmin: T.Buffer(supers, "float16"),
                x: T.Buffer(x_shape, "float32"), res: T.Buffer(out_shape, "float32"),
                out: T.Buffer(out_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            run(codes, (words0, words1, words2, d, dmin), x, res, out)
        return k_quant_residual
    if kquant:
        @T.prim_func(private=True)
        def k_quant(codes: T.Buffer(codes_shape, codes_dtype), words0: T.Buffer(supers, "uint32"),
                    words1: T.Buffer(supers, "uint32"), words2: T.Buffer(supers, "uint32"),
                    d: T.Buffer(supers, "float16"), dmin: T.Buffer(supers, "float16"),
                    x: T.Buffer(x_shape, "float32"), out: T.Buffer(out_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            run(codes, (words0, words1, words2, d, dmin), x, out, out)
        return k_quant
    if with_min and residual:
        @T.prim_func(private=True)
        def affine_residual(
                codes: T.Buffer(codes_shape, codes_dtype), scales: T.Buffer(shape, scale_dtype),
                mins: T.Buffer(shape, scale_dtype), x: T.Buffer(x_shape, "float32"),
                res: T.Buffer(out_shape, "float32"), out: T.Buffer(out_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            run(codes, (scales, mins), x, res, out)
        return affine_residual
    if with_min:
        @T.prim_func(private=True)
        def affine(codes: T.Buffer(codes_shape, codes_dtype),
                   scales: T.Buffer(shape, scale_dtype), mins: T.Buffer(shape, scale_dtype),
                   x: T.Buffer(x_shape, "float32"), out: T.Buffer(out_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            run(codes, (scales, mins), x, out, out)
        return affine
    if residual:
        @T.prim_func(private=True)
        def plus_residual(codes: T.Buffer(codes_shape, codes_dtype),
                          scales: T.Buffer(shape, scale_dtype), x: T.Buffer(x_shape, "float32"),
                          res: T.Buffer(out_shape, "float32"), out: T.Buffer(out_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            run(codes, (scales,), x, res, out)
        return plus_residual

    @T.prim_func(private=True)
    def plain(codes: T.Buffer(codes_shape, codes_dtype), scales: T.Buffer(shape, scale_dtype),
              x: T.Buffer(x_shape, "float32"), out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        run(codes, (scales,), x, out, out)
    return plain
    # fmt: on
