"""Declare every kernel's buffer parameters distinct ("tirx.noalias").

TVM 0.27's LLVM code generator keeps one alias set per library: once any PrimFunc lacks
`tirx.noalias` (the VM's shape functions, some of the KV cache's kernels), every buffer
access of every kernel gets the same all-aliasing TBAA tag. LLVM then reloads weights and
scales after each accumulator store instead of keeping accumulators in registers (SmolLM2's
decode gate/up GEMV: 61 µs alone, 88 µs in the library). The VM and the KV cache never pass
overlapping tensors to one kernel, so the attribute is true of all of them."""

from __future__ import annotations

import tvm
from tvm import tirx


@tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
class MarkNoAlias:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and not (func.attrs or {}).get("tirx.noalias"):
                mod[gv] = func.with_attr("tirx.noalias", True)
        return mod
