"""Group each dequantize kernel with the matmul kernel that consumes it (one TIR function)."""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import TuplePattern, is_op, wildcard

from fmc.lowering.tir_util import block_names

DEQUANTIZE_PREFIX = "dequantize"
MAX_KERNEL_INPUTS = 5


def _has_matmul_block(func: tirx.PrimFunc) -> bool:
    return any("matmul" in name for name in block_names(func))


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
class FuseDequantizeMatmul:
    """Runs after FuseOps/FuseTIR: a `dequantize_*` call whose result feeds a kernel holding a
    matmul (with its fused epilogue) becomes part of that kernel. Stock FuseOps never fuses an
    injective producer into a reduction, so without this the dequantized weight is written
    to memory in full before every matmul."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        matmuls = {gv.name_hint for gv, func in mod.functions_items()
                   if isinstance(func, tirx.PrimFunc) and _has_matmul_block(func)}
        def check(context: relax.transform.PatternCheckContext) -> bool:
            producer = context.annotated_expr["dequantize"].args[0].name_hint
            kernel = context.annotated_expr["consumer"].args[0].name_hint
            return producer.startswith(DEQUANTIZE_PREFIX) and kernel in matmuls

        # The dequantized weight may be any argument of a kernel with 2–5 inputs (the
        # matmul plus whatever epilogue FuseOps merged into it: bias, residual, gate).
        patterns = []
        for arity in range(2, MAX_KERNEL_INPUTS + 1):
            for position in range(arity):
                dequantize = is_op("relax.call_tir")(wildcard(), wildcard(),
                                                     add_constraint=False)
                args = [dequantize if i == position else wildcard() for i in range(arity)]
                consumer = is_op("relax.call_tir")(wildcard(), TuplePattern(args),
                                                   add_constraint=False)
                patterns.append(relax.transform.FusionPattern(
                    "dequantize_matmul", consumer,
                    {"dequantize": dequantize, "consumer": consumer}, check))
        mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False)(mod)
        return relax.transform.FuseTIR()(mod)
