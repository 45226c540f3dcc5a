"""Swap the CPU's matmul kernels over 4- and 8-bit weights for integer-dot kernels
(fmc.lowering.kernels.int8_dot_cpu): int8 activations, `vpdpbusd` over the weights' codes.

A kernel qualifies when it is a matmul — decode (x is [1, 1, K]), prefill ([1, T, K]) or
batched decode ([B, 1, K]) — over a row-interleaved q4f16, q4f32, q4_0, q4_1, q4k or q8f16
weight: a single `NT_matmul` block, optionally followed by the residual `T_add` (o_proj's and
down_proj's epilogue), with the parameters (the scheme's stored arrays, x[, residual], out).
Anything else keeps the float kernel. Runs in the fuse phase before the add→norm merge; the
integer kernels are scheduled by hand and marked so."""

from __future__ import annotations

import re

import tvm
from tvm import tirx

from fmc.lowering.kernels.int8_dot_cpu import GROUP, LANES, SUPER, integer_dot
from fmc.lowering.tir_util import block_names

# Scheme → (code bits, zero point, kind): value = (code − zero)·scale; "affine": value =
# code·scale + minimum; "k-quant": Q4_K's packed 6-bit sub-block scales and minimums.
# q8f16's signed codes are read as unsigned bytes (code + 128), hence its zero 128.
SCHEMES = {"q4f16": (4, 7, "zero"), "q4f32": (4, 7, "zero"), "q4_0": (4, 8, "zero"),
           "q4_1": (4, 0, "affine"), "q8f16": (8, 128, "zero"), "q4k": (4, 0, "k-quant")}
# fmc names a dequantize kernel `dequantize_SCHEME` (rows-interleaved: `SCHEME_rows16`), and
# fusion prefixes "fused_" and may append a de-duplication number.
KERNEL = re.compile(rf"(?:^|_)dequantize_(?P<scheme>\w+?)_rows{LANES}\d*_")
SCALE_DTYPES = ("float16", "float32")


def weight_layout(bits: int, kind: str, n: int, k: int) -> list[tuple[tuple[str, ...], list]]:
    """(allowed dtypes, shape) of each stored weight array, in parameter order."""
    codes = (("uint32",), [n // LANES, k // 8, LANES]) if bits == 4 \
        else (("int8",), [n // LANES, k, LANES])
    if kind == "k-quant":
        supers = [n // LANES, k // SUPER, LANES]
        return [codes, *[(("uint32",), supers)] * 3, *[(("float16",), supers)] * 2]
    groups = (SCALE_DTYPES, [n // LANES, k // GROUP, LANES])
    return [codes, groups, groups] if kind == "affine" else [codes, groups]


def _static(shape) -> list[int] | None:
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in shape]
    return None if None in dims else dims


def token_layout(x_shape, out_shape) -> str | None:
    """"one" ([1, 1, K]), "seq" ([1, T, K]) or "batch" ([B, 1, K]) when x and the output
    agree on the token dimensions; None otherwise."""
    if len(x_shape) != 3 or len(out_shape) != 3:
        return None
    leading = [int(d) if isinstance(d, tirx.IntImm) else d for d in x_shape[:2]]
    others = [int(d) if isinstance(d, tirx.IntImm) else d for d in out_shape[:2]]
    if any(not (a == b if isinstance(a, int) else a.same_as(b))
           for a, b in zip(leading, others, strict=True)):
        return None
    symbolic = [isinstance(d, tirx.Var) for d in leading]
    if leading == [1, 1]:
        return "one"
    if leading[0] == 1 and symbolic[1]:
        return "seq"
    if symbolic[0] and leading[1] == 1:
        return "batch"
    return None


def match(name: str, func: tirx.PrimFunc) -> dict | None:
    """What the integer-dot kernel needs (`integer_dot`'s arguments), or None."""
    found = KERNEL.search(name)
    if found is None or found.group("scheme") not in SCHEMES:
        return None
    bits, zero, kind = SCHEMES[found.group("scheme")]
    blocks = block_names(func)
    if blocks not in (["NT_matmul"], ["NT_matmul", "T_add"]):
        return None
    residual = len(blocks) == 2
    params = [p.ty for p in func.params]  # 0.27: parameters are typed as buffers
    if not all(hasattr(b, "shape") for b in params) or len(params) < 4:
        return None
    layout_size = len(params) - 2 - residual
    x, out = params[layout_size], params[-1]
    tokens = token_layout(x.shape, out.shape)
    if tokens is None or _static(x.shape[2:]) is None or _static(out.shape[2:]) is None:
        return None
    k, n = int(x.shape[2]), int(out.shape[2])
    if n % LANES or k % (SUPER if kind == "k-quant" else GROUP):
        return None
    layout = weight_layout(bits, kind, n, k)
    shapes = [_static(b.shape) for b in params[:layout_size]]
    if len(layout) != layout_size or any(
            str(b.dtype) not in dtypes or shape != expected
            for b, shape, (dtypes, expected) in zip(params, shapes, layout, strict=False)):
        return None
    if kind == "affine" and str(params[1].dtype) != str(params[2].dtype):
        return None
    if any(str(b.dtype) != "float32" for b in params[layout_size:]):
        return None
    if residual and token_layout(params[-2].shape, out.shape) != tokens:
        return None
    return {"n": n, "k": k, "bits": bits, "zero": zero, "scale_dtype": str(params[1].dtype),
            "residual": residual, "with_min": kind != "zero", "kquant": kind == "k-quant",
            "tokens": tokens}


@tvm.transform.module_pass(opt_level=0, name="CPUInt8Dot")
class CPUInt8Dot:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            found = match(gv.name_hint, func)
            if found is not None:
                mod[gv] = integer_dot(**found)
        return mod
