"""Group each dequantize kernel with the matmul kernel that consumes it (one TIR function)."""

from __future__ import annotations

import tvm

from fmc.lowering.passes.merge_kernels import has_matmul, merge_kernels

DEQUANTIZE_PREFIX = "dequantize"
# The dequantized weight may be any argument of a kernel with 2–5 inputs (the matmul plus
# whatever epilogue FuseOps merged into it: bias, residual, gate).
CONSUMER_INPUTS = range(2, 6)


def is_dequantize(name: str, _blocks: list[str]) -> bool:
    return name.startswith(DEQUANTIZE_PREFIX)


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
class FuseDequantizeMatmul:
    """Runs after FuseOps/FuseTIR: a `dequantize_*` call whose result feeds a kernel holding a
    matmul (with its fused epilogue) becomes part of that kernel. Stock FuseOps never fuses an
    injective producer into a reduction, so without this the dequantized weight is written
    to memory in full before every matmul."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return merge_kernels(mod, "dequantize_matmul", is_dequantize, has_matmul,
                             CONSUMER_INPUTS)
