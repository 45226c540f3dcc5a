"""Merge a producer kernel into the kernel that consumes its output (one TIR function).

The shared mechanism of the dequantize→matmul, add→norm and norm→GEMM fusions: match a
`call_tir` whose argument is another `call_tir`, group the two with FuseOpsByPattern and let FuseTIR
inline both bodies into one PrimFunc. A producer output that is also used elsewhere (the
residual stream) becomes a second output of the merged kernel."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import TuplePattern, is_op, wildcard

from fmc.lowering.tir_util import block_names

MAX_KERNEL_INPUTS = 8

# (kernel name, its block names) → whether the kernel plays the role
KernelTest = Callable[[str, list[str]], bool]


def has_matmul(_name: str, blocks: list[str]) -> bool:
    return any("matmul" in block for block in blocks)


def merge_kernels(mod: tvm.IRModule, group: str, is_producer: KernelTest,
                  is_consumer: KernelTest,
                  arities: range = range(1, MAX_KERNEL_INPUTS + 1)) -> tvm.IRModule:
    """Merge every call of a producer kernel whose result is an argument of a consumer
    kernel taking `arities` inputs. `group` names the FuseOpsByPattern groups."""
    kernels = {gv.name_hint: block_names(func) for gv, func in mod.functions_items()
               if isinstance(func, tirx.PrimFunc)}  # one schedule walk per kernel
    producers = {name for name, blocks in kernels.items() if is_producer(name, blocks)}
    consumers = {name for name, blocks in kernels.items() if is_consumer(name, blocks)}
    if not producers or not consumers:
        return mod

    def check(context: relax.transform.PatternCheckContext) -> bool:
        producer = context.annotated_expr["producer"].args[0].name_hint
        consumer = context.annotated_expr["consumer"].args[0].name_hint
        return producer in producers and consumer in consumers

    patterns = []
    for arity in arities:
        for position in range(arity):
            producer = is_op("relax.call_tir")(wildcard(), wildcard(), add_constraint=False)
            args = [producer if i == position else wildcard() for i in range(arity)]
            consumer = is_op("relax.call_tir")(wildcard(), TuplePattern(args),
                                               add_constraint=False)
            patterns.append(relax.transform.FusionPattern(
                group, consumer, {"producer": producer, "consumer": consumer}, check))
    mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False)(mod)
    return relax.transform.FuseTIR()(mod)
