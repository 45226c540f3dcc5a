"""Merge a producer kernel into the kernel that consumes its output (one TIR function).

The shared mechanism of the add→norm and norm→GEMM fusions: pattern-match a `call_tir`
whose argument is another `call_tir`, group the two with FuseOpsByPattern and let FuseTIR
inline both bodies into one PrimFunc. A producer output that is also used elsewhere (the
residual stream) becomes a second output of the merged kernel."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import TuplePattern, is_op, wildcard

MAX_KERNEL_INPUTS = 8

KernelTest = Callable[[str, tirx.PrimFunc], bool]


def merge_kernels(mod: tvm.IRModule, group: str, is_producer: KernelTest,
                  is_consumer: KernelTest) -> tvm.IRModule:
    """Merge every call of a producer kernel whose result is an argument of a consumer
    kernel. `group` names the merged kernels (FuseTIR prefixes it with `fused_`)."""
    kernels = {gv.name_hint: func for gv, func in mod.functions_items()
               if isinstance(func, tirx.PrimFunc)}
    producers = {name for name, func in kernels.items() if is_producer(name, func)}
    consumers = {name for name, func in kernels.items() if is_consumer(name, func)}
    if not producers or not consumers:
        return mod

    def check(context: relax.transform.PatternCheckContext) -> bool:
        producer = context.annotated_expr["producer"].args[0].name_hint
        consumer = context.annotated_expr["consumer"].args[0].name_hint
        return producer in producers and consumer in consumers

    patterns = []
    for arity in range(1, MAX_KERNEL_INPUTS + 1):
        for position in range(arity):
            producer = is_op("relax.call_tir")(wildcard(), wildcard(), add_constraint=False)
            args = [producer if i == position else wildcard() for i in range(arity)]
            consumer = is_op("relax.call_tir")(wildcard(), TuplePattern(args),
                                               add_constraint=False)
            patterns.append(relax.transform.FusionPattern(
                group, consumer, {"producer": producer, "consumer": consumer}, check))
    mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False)(mod)
    return relax.transform.FuseTIR()(mod)
