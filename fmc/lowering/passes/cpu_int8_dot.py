"""Swap the CPU's decode GEMV kernels over 4- and 8-bit weights for integer-dot kernels
(fmc.lowering.kernels.int8_gemv_cpu): int8 activations, `vpdpbusd` over the weights' codes.

A kernel qualifies when it is a decode matmul (one token: x is [1, 1, K]) over a
row-interleaved q4f16, q4f32, q4_0, q4_1 or q8f16 weight — a single `NT_matmul` block, optionally
followed by the residual `T_add` (o_proj's and down_proj's epilogue) — with the parameters
(codes, scales[, minimums], x[, residual], out). Anything else keeps the float kernel.
Runs in the fuse phase before the add→norm merge; the integer kernels are scheduled by hand
and marked so."""

from __future__ import annotations

import re

import tvm
from tvm import tirx

from fmc.lowering.kernels.int8_gemv_cpu import GROUP, LANES, gemv
from fmc.lowering.tir_util import block_names

# Scheme → its zero point: value = (code − zero)·scale; None: value = code·scale + minimum.
# q8f16's signed codes are read as unsigned bytes (code + 128), hence its zero 128.
ZERO_POINTS = {"q4f16": 7, "q4f32": 7, "q4_0": 8, "q4_1": None, "q8f16": 128}
CODE_BITS = {"q8f16": 8}
# fmc names a dequantize kernel `dequantize_SCHEME` (rows-interleaved: `SCHEME_rows16`), and
# fusion prefixes "fused_" and may append a de-duplication number.
KERNEL = re.compile(rf"(?:^|_)dequantize_(?P<scheme>\w+?)_rows{LANES}\d*_")


def _static(shape) -> list[int] | None:
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in shape]
    return None if None in dims else dims


def match(name: str, func: tirx.PrimFunc) -> dict | None:
    """What the integer-dot kernel needs (n, k, code bits, zero, scale dtype, residual,
    minimums), or None."""
    found = KERNEL.search(name)
    if found is None or found.group("scheme") not in ZERO_POINTS:
        return None
    blocks = block_names(func)
    if blocks not in (["NT_matmul"], ["NT_matmul", "T_add"]):
        return None
    residual = len(blocks) == 2
    zero = ZERO_POINTS[found.group("scheme")]
    bits = CODE_BITS.get(found.group("scheme"), 4)
    params = [p.ty for p in func.params]  # 0.27: parameters are typed as buffers
    if not all(hasattr(b, "shape") for b in params):
        return None
    if len(params) != 4 + residual + (zero is None):
        return None
    if zero is None:  # the minimums: the same shape and dtype as the scales
        if _static(params[1].shape) != _static(params[2].shape) \
                or str(params[1].dtype) != str(params[2].dtype):
            return None
        params = [params[0], params[1], *params[3:]]
    codes, scales, x, *rest = params
    shapes = [_static(b.shape) for b in params]
    if None in shapes:
        return None
    out = shapes[-1]
    if len(out) != 3 or out[:2] != [1, 1] or shapes[2][:2] != [1, 1]:
        return None
    n, k = out[2], shapes[2][2]
    codes_layout = ("uint32", [n // LANES, k // 8, LANES]) if bits == 4 \
        else ("int8", [n // LANES, k, LANES])
    if (str(codes.dtype), shapes[0]) != codes_layout \
            or shapes[1] != [n // LANES, k // GROUP, LANES] \
            or str(scales.dtype) not in ("float16", "float32") \
            or any(str(b.dtype) != "float32" for b in (x, *rest)) \
            or (residual and shapes[3] != out):
        return None
    return {"n": n, "k": k, "bits": bits, "zero": zero or 0, "scale_dtype": str(scales.dtype),
            "residual": residual, "with_min": zero is None}


@tvm.transform.module_pass(opt_level=0, name="CPUInt8Dot")
class CPUInt8Dot:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            found = match(gv.name_hint, func)
            if found is not None:
                mod[gv] = gemv(**found)
        return mod
