"""Integer-dot decode GEMV for the CPU: y = W·x with 4-bit weights and int8 activations.

The float path decodes every 4-bit code to float32 and takes one FMA per code and row. This
kernel does what llama.cpp does on x86: quantize the activation vector once per call to int8
in blocks of 32 (scale amax/127, plus each block's sum of codes), multiply the weights' codes
with it in integer arithmetic — `vpdpbusd` (AVX-512 VNNI) multiplies 4 unsigned bytes by 4
signed bytes and adds them into an int32 lane — and apply the float scales once per group:

    y[n] = Σ_g s[n, g] · xd[g] · (Σ_{k∈g} c[n, k] · xq[k] − z · Σ_{k∈g} xq[k])

for value = (c − z)·s (q4f16, q4f32: z = 7; q4_0: z = 8), and for value = c·s + m (q4_1)

    y[n] = Σ_g xd[g] · (s[n, g] · Σ_{k∈g} c[n, k] · xq[k] + m[n, g] · Σ_{k∈g} xq[k]).

Weights are the CPU's row-interleaved layout ([N/16, K/8, 16] uint32 codes, [N/16, K/32, 16]
scales and minimums): one 64-byte load holds a packed word of each of 16 rows, so lane r of
the int32 accumulator is row r.
Of a word's 8 nibbles, `w & 0x0F0F0F0F` gives codes 0, 2, 4, 6 as bytes and
`(w >> 4) & 0x0F0F0F0F` codes 1, 3, 5, 7; the activation bytes are stored in that order
(even and odd elements apart), so two `vpdpbusd` per word need no shuffle.

The integer sums are exact; the result differs from the float path by the rounding of the
activations to int8 only (the tolerance is in docs/quantization.md)."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

LANES = 16  # int32/float32 lanes of a 512-bit vector = weight rows per row block
GROUP = 32  # weights per scale group (q4f16, q4f32, q4_0); activation blocks match it
WORDS = GROUP // 8  # packed words per group and row
ROW_BLOCKS = 2  # row blocks per task: independent accumulator chains
VNNI = "llvm.x86.avx512.vpdpbusd.512"
NIBBLES = 0x0F0F0F0F


def gemv_q4(n: int, k: int, zero: int, scale_dtype: str, residual: bool,
            with_min: bool = False) -> tvm.tirx.PrimFunc:
    """The kernel for an [n, k] weight. Parameters: codes [n/16, k/8, 16] uint32, scales
    [n/16, k/32, 16], (with `with_min`: the minimums, same shape), x [1, 1, k], then (with
    `residual`) a [1, 1, n] tensor added to the result — o_proj's and down_proj's residual
    epilogue — and the output [1, 1, n]."""
    assert n % LANES == 0 and k % GROUP == 0
    groups = k // GROUP
    per_task = next(b for b in (ROW_BLOCKS, 1) if n // LANES % b == 0)
    tasks = n // LANES // per_task

    # fmt: off
    @T.macro
    def quantize_activation(x, even, odd, xd, xs):
        """x → int8 per block of 32: the even elements of word i of block g packed into
        even[4g + i] (4 bytes), the odd ones into odd[4g + i]; xd = amax/127, xs = Σ codes."""
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
            for i in T.serial(WORDS):
                for parity in T.serial(2):
                    packed = T.alloc_buffer((1,), "int32", scope="local")
                    packed[0] = 0
                    for b in T.unroll(4):
                        q: T.let[T.int32] = T.Cast("int32", T.round(
                            x[0, 0, g * GROUP + i * 8 + 2 * b + parity] * inverse))
                        total[0] = total[0] + q
                        packed[0] = packed[0] | ((q & 255) << (8 * b))
                    if parity == 0:
                        even[g * WORDS + i] = packed[0]
                    else:
                        odd[g * WORDS + i] = packed[0]
            xs[g] = total[0]

    @T.macro
    def dot_rows(codes, scales, mins, even, odd, xd, xs, out, res):
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
                for i in T.unroll(WORDS):
                    for rb in T.unroll(per_task):
                        word = codes[task * per_task + rb, g * WORDS + i, T.ramp(0, 1, LANES)]
                        low = word & T.broadcast(T.uint32(NIBBLES), LANES)
                        high = (word >> T.broadcast(T.uint32(4), LANES)) & \
                            T.broadcast(T.uint32(NIBBLES), LANES)
                        step = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, isum[T.ramp(rb * LANES, 1, LANES)],
                            T.reinterpret("int8x64", low),
                            T.reinterpret("int8x64", T.broadcast(even[g * WORDS + i], LANES)))
                        isum[T.ramp(rb * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, step, T.reinterpret("int8x64", high),
                            T.reinterpret("int8x64", T.broadcast(odd[g * WORDS + i], LANES)))
                for rb in T.unroll(per_task):
                    block: T.let[T.int32] = task * per_task + rb
                    step_scale = T.broadcast(xd[g], LANES)
                    scale = T.Cast("float32x16", scales[block, g, T.ramp(0, 1, LANES)]) * \
                        step_scale
                    if with_min:  # decided while parsing
                        low = T.Cast("float32x16", mins[block, g, T.ramp(0, 1, LANES)]) * \
                            step_scale
                        acc[T.ramp(rb * LANES, 1, LANES)] = \
                            acc[T.ramp(rb * LANES, 1, LANES)] + \
                            T.Cast("float32x16", isum[T.ramp(rb * LANES, 1, LANES)]) * scale + \
                            low * T.broadcast(T.Cast("float32", xs[g]), LANES)
                    else:
                        centred = isum[T.ramp(rb * LANES, 1, LANES)] - T.broadcast(
                            xs[g] * zero, LANES)
                        acc[T.ramp(rb * LANES, 1, LANES)] = \
                            acc[T.ramp(rb * LANES, 1, LANES)] + \
                            T.Cast("float32x16", centred) * scale
            for rb in T.unroll(per_task):
                rows: T.let[T.int32] = (task * per_task + rb) * LANES
                if residual:  # decided while parsing: `residual` is a Python bool
                    out[0, 0, T.ramp(rows, 1, LANES)] = acc[T.ramp(rb * LANES, 1, LANES)] + \
                        res[0, 0, T.ramp(rows, 1, LANES)]
                else:
                    out[0, 0, T.ramp(rows, 1, LANES)] = acc[T.ramp(rb * LANES, 1, LANES)]

    shape = (n // LANES, groups, LANES)

    @T.macro
    def run(codes, scales, mins, x, res, out):
        even = T.alloc_buffer((groups * WORDS,), "int32")
        odd = T.alloc_buffer((groups * WORDS,), "int32")
        xd = T.alloc_buffer((groups,), "float32")
        xs = T.alloc_buffer((groups,), "int32")
        quantize_activation(x, even, odd, xd, xs)
        dot_rows(codes, scales, mins, even, odd, xd, xs, out, res)

    @T.prim_func(private=True)
    def plain(codes: T.Buffer((n // LANES, k // 8, LANES), "uint32"),
              scales: T.Buffer(shape, scale_dtype), x: T.Buffer((1, 1, k), "float32"),
              out: T.Buffer((1, 1, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        run(codes, scales, scales, x, out, out)

    @T.prim_func(private=True)
    def plus_residual(codes: T.Buffer((n // LANES, k // 8, LANES), "uint32"),
                      scales: T.Buffer(shape, scale_dtype), x: T.Buffer((1, 1, k), "float32"),
                      res: T.Buffer((1, 1, n), "float32"), out: T.Buffer((1, 1, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        run(codes, scales, scales, x, res, out)

    @T.prim_func(private=True)
    def affine(codes: T.Buffer((n // LANES, k // 8, LANES), "uint32"),
               scales: T.Buffer(shape, scale_dtype), mins: T.Buffer(shape, scale_dtype),
               x: T.Buffer((1, 1, k), "float32"), out: T.Buffer((1, 1, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        run(codes, scales, mins, x, out, out)

    @T.prim_func(private=True)
    def affine_residual(codes: T.Buffer((n // LANES, k // 8, LANES), "uint32"),
                        scales: T.Buffer(shape, scale_dtype), mins: T.Buffer(shape, scale_dtype),
                        x: T.Buffer((1, 1, k), "float32"), res: T.Buffer((1, 1, n), "float32"),
                        out: T.Buffer((1, 1, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        run(codes, scales, mins, x, res, out)
    # fmt: on
    if with_min:
        return affine_residual if residual else affine
    return plus_residual if residual else plain
