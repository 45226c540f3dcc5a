"""Remove pure data copies from the graph before they become kernels.

- concat(split(x)) → x: the copy horizontal fusion leaves before fused-QKV attention;
- reshape(reshape(x)) → reshape(x): FuseOps would merge the pair into a copy kernel, while a
  single reshape becomes a free view (RewriteDataflowReshape)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def _axis(value: int, ndim: int) -> int:
    return value + ndim if value < 0 else value


@mutator
class _Simplifier(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == tvm.ir.Op.get("relax.reshape"):
            return self._reshape(call)
        if call.op != tvm.ir.Op.get("relax.concat") or not isinstance(call.args[0], relax.Tuple):
            return call
        pieces = call.args[0].fields
        source = None
        for position, piece in enumerate(pieces):
            item = self.lookup_binding(piece) if isinstance(piece, relax.Var) else piece
            if not (isinstance(item, relax.TupleGetItem) and item.index == position):
                return call
            if source is None:
                source = item.tuple_value
            elif not item.tuple_value.same_as(source):
                return call
        split = self.lookup_binding(source) if isinstance(source, relax.Var) else source
        if not (isinstance(split, relax.Call) and split.op == tvm.ir.Op.get("relax.split")):
            return call
        whole = split.args[0]
        ndim = len(whole.ty.shape.values)
        sections = split.attrs.indices_or_sections
        count = len(sections) + 1 if hasattr(sections, "__len__") else int(sections)
        if count != len(pieces) or _axis(int(split.attrs.axis), ndim) != _axis(
                int(call.attrs.axis), ndim):
            return call
        return whole


    def _reshape(self, call: relax.Call) -> relax.Expr:
        inner = call.args[0]
        value = self.lookup_binding(inner) if isinstance(inner, relax.Var) else inner
        if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.reshape"):
            return relax.op.reshape(value.args[0], call.args[1])
        return call


@tvm.transform.module_pass(opt_level=0, name="SimplifyCopies")
class SimplifyCopies:
    """Concatenating, in order and along the same axis, every piece of a split gives back the
    split's input; a reshape of a reshape is one reshape."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        simplifier = _Simplifier(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mod[gv] = simplifier.visit_expr(func)
        return relax.transform.DeadCodeElimination()(mod)
