"""Put the stores of the VM's shape functions in a fixed order.

`VMShapeLower` emits one store per symbolic shape value into the shape heap, in the order of
a pointer-keyed hash map, so two compiles of the same model produced libraries that differed
in a few instructions (found comparing two builds byte by byte). Each store writes a
distinct heap slot from slots computed before the function; sorted by slot, the function is
the same program in every build. A function whose stores read a slot it also writes keeps
its order."""

from __future__ import annotations

import re

import tvm
from tvm import tirx

_SLOT = re.compile(r"\[T\.int64\((\d+)\)\]")


def _slot(store) -> int | None:
    index = store.indices[0] if len(store.indices) == 1 else None
    return int(index) if isinstance(index, tirx.IntImm) else None


def canonical_order(func: tirx.PrimFunc) -> tirx.PrimFunc:
    body = func.body
    stores = list(getattr(body, "seq", []))
    if len(stores) < 2 or not all(isinstance(s, tirx.BufferStore) for s in stores):
        return func
    slots = [_slot(s) for s in stores]
    if None in slots or len({s.buffer.name for s in stores}) != 1:
        return func
    reads = {int(m) for s in stores for m in _SLOT.findall(str(s.value))}
    if reads & set(slots):
        return func  # a store depends on another: the order is meaningful
    ordered = [store for _, store in sorted(zip(slots, stores, strict=True),
                                            key=lambda pair: pair[0])]
    return func.with_body(tirx.SeqStmt(ordered))


@tvm.transform.module_pass(opt_level=0, name="CanonicalShapeFuncs")
class CanonicalShapeFuncs:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func"):
                mod[gv] = canonical_order(func)
        return mod
