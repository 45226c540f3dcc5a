"""Swap the CPU's matmul kernels over 4- and 8-bit weights for integer-dot kernels
(fmc.lowering.kernels.int8_dot_cpu): int8 activations, `vpdpbusd` over the weights' codes.

A kernel qualifies when it is a matmul — decode (x is [1, 1, K]), prefill ([1, T, K]) or
batched decode ([B, 1, K]) — over a row-interleaved weight of a scheme in SCHEMES: a single
`NT_matmul` block, optionally followed by the residual `T_add` (o_proj's and down_proj's
epilogue), with the parameters (the scheme's stored arrays, x[, residual], out). So does
the MoE expert kernels over stacked row-interleaved experts (fmc.nn_moe): prompts' grouped
GEMM and decode's gathered GEMVs; their kernels take the fused kernel's parameter order.
Anything else keeps the float kernel. Runs in the fuse phase before the add→norm merge; the
integer kernels are scheduled by hand and marked so."""

from __future__ import annotations

import dataclasses
import re

import tvm
from tvm import tirx

from fmc.lowering.kernels.int8_dot_cpu import LANES, WeightFormat, integer_dot
from fmc.lowering.tir_util import block_names
from fmc.nn_moe import GROUP_ROWS, GROUPED_STAGE, MATMUL_STAGE

# Scheme → its weight format (scale dtype filled in from the kernel's parameters). q8f16's
# signed codes are read as unsigned bytes (code + 128), hence its zero 128.
SCHEMES = {"q4f16": WeightFormat(4, 7, "group"), "q4f32": WeightFormat(4, 7, "group"),
           "q4_0": WeightFormat(4, 8, "group"), "q4_1": WeightFormat(4, 0, "group+min"),
           "q5_0": WeightFormat(4, 16, "group", high_bits=1),
           "q5_1": WeightFormat(4, 0, "group+min", high_bits=1),
           "q4k": WeightFormat(4, 0, "k-quant"), "q5k": WeightFormat(4, 0, "k-quant", high_bits=1),
           "q6k": WeightFormat(4, 32, "q6k", high_bits=2), "q8f16": WeightFormat(8, 128, "group")}
# fmc names a dequantize kernel `dequantize_SCHEME` (rows-interleaved: `SCHEME_rows16`), and
# fusion prefixes "fused_" and may append a de-duplication number.
KERNEL = re.compile(rf"(?:^|_)dequantize_(?P<scheme>\w+?)_rows{LANES}\d*_")
# The expert kernels (fmc.quant.modules): `moe_grouped_SCHEME_rows16` (prompts' grouped
# GEMM) and `moe_experts_SCHEME_rows16` (decode's gathered GEMVs), maybe numbered.
GROUPED_KERNEL = re.compile(rf"^moe_grouped_(?P<scheme>\w+?)_rows{LANES}\d*$")
GATHERED_KERNEL = re.compile(rf"^moe_experts_(?P<scheme>\w+?)_rows{LANES}\d*$")
SCALE_DTYPES = ("float16", "float32")


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
    fmt = SCHEMES[found.group("scheme")]
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
    if n % LANES or k % fmt.block:
        return None
    fmt = _with_scale_dtype(fmt, params)
    if fmt is None:
        return None
    if [(_static(b.shape), str(b.dtype)) for b in params[:layout_size]] != \
            [(list(shape), dtype) for shape, dtype in fmt.arrays(n, k)]:
        return None
    if any(str(b.dtype) != "float32" for b in params[layout_size:]):
        return None
    if residual and token_layout(params[-2].shape, out.shape) != tokens:
        return None
    return {"n": n, "k": k, "fmt": fmt, "residual": residual, "tokens": tokens}


def _with_scale_dtype(fmt: WeightFormat, arrays) -> WeightFormat | None:
    """A group-scaled format with its scales' dtype (float16 or float32: q4f16 / q4f32)
    read from the stored arrays; None for another dtype."""
    if not fmt.scales.startswith("group"):
        return fmt
    scale_dtype = str(arrays[1 + (fmt.high_bits > 0)].dtype)
    return dataclasses.replace(fmt, scale_dtype=scale_dtype) \
        if scale_dtype in SCALE_DTYPES else None


def expert_kernel(name: str, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The integer-dot kernel, with the same parameters, for an MoE expert kernel over
    stacked row-interleaved experts, or None:
    - the grouped GEMM of prompts: x [R, K] (float32), the blocks' experts [R / GROUP_ROWS]
      (int32), the stacked arrays [E, …], symbolic sizes, out [R / GROUP_ROWS, GROUP_ROWS, N];
    - the gathered GEMVs of decode: x [T, K] (every slot reads its token's row; gate, up)
      or [T, S, K] (a row per slot; down), the chosen experts [T, S], the stacked arrays,
      out [T, S, N]."""
    found = GROUPED_KERNEL.search(name) or GATHERED_KERNEL.search(name)
    if found is None or found.group("scheme") not in SCHEMES:
        return None
    grouped = found.re is GROUPED_KERNEL
    if block_names(func) != [GROUPED_STAGE if grouped else MATMUL_STAGE]:
        return None
    buffers = [i for i, p in enumerate(func.params) if hasattr(p.ty, "shape")]
    if len(buffers) < 5:
        return None
    x, chosen, *arrays, out = (func.params[i].ty for i in buffers)
    per_slot = not grouped and len(x.shape) == 3
    if len(x.shape) != 2 + per_slot or len(chosen.shape) != (1 if grouped else 2) or \
            len(out.shape) != 3 or str(x.dtype) != "float32" or \
            str(chosen.dtype) != "int32" or str(out.dtype) != "float32" or \
            _static(out.shape[2:]) is None or _static(x.shape[-1:]) is None:
        return None
    k, n = int(x.shape[-1]), int(out.shape[2])
    fmt = _with_scale_dtype(SCHEMES[found.group("scheme")], arrays)
    if fmt is None or n % LANES or k % fmt.block or \
            (grouped and _static(out.shape[1:2]) != [GROUP_ROWS]):
        return None
    experts = _static(arrays[0].shape[:1])
    if experts is None or [(_static(a.shape), str(a.dtype)) for a in arrays] != \
            [([experts[0], *shape], dtype) for shape, dtype in fmt.arrays(n, k)]:
        return None
    tokens = "grouped" if grouped else "slots" if per_slot else "gathered"
    kernel = integer_dot(n, k, fmt, False, tokens, experts=experts[0])
    # integer_dot's order is (arrays…, x, experts, out); the caller passes the fused
    # kernel's (x, experts, arrays…, sizes…, out). Sizes are derivable, so unused.
    *stored, new_x, new_chosen, new_out = kernel.params
    by_role = dict(zip(buffers, [new_x, new_chosen, *stored, new_out], strict=True))
    params = [by_role[i] if i in by_role else tirx.Var(p.name, p.ty)
              for i, p in enumerate(func.params)]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, attrs=kernel.attrs)


@tvm.transform.module_pass(opt_level=0, name="CPUInt8Dot")
class CPUInt8Dot:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            found = match(gv.name_hint, func)
            if found is not None:
                mod[gv] = integer_dot(**found)
                continue
            experts = expert_kernel(gv.name_hint, func)
            if experts is not None:
                mod[gv] = experts
        return mod
