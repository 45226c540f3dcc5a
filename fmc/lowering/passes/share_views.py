"""Fewer VM builtin calls per step: one tensor object per distinct view of planned memory,
and no kills that free nothing.

After static memory planning every intermediate is `alloc_tensor(storage, offset, shape,
dtype)`: a view of a storage that the plan reuses layer after layer. Each binding is a VM
builtin call that creates a new tensor object, every reshape another, and
KillAfterLastUse adds a `null_value` call after each last use — SmolLM2's decode step made
≈240 view allocations, 60 reshapes and ≈610 kills for 30 layers, each a builtin call of
about a microsecond.

- ShareViews (before kill-after-last-use): a view identical to an earlier one (same storage
  variable, offset, shape and dtype) is that earlier object; a reshape of a view is a view
  of the same bytes. Identical views are the same bytes read the same way, and the plan
  never gives two live tensors overlapping bytes, so sharing the object changes nothing;
  KillAfterLastUse then kills each shared object after its last use.
- DropParamKills (after it): killing an element of a parameter tuple frees nothing (the
  caller's tuple holds it), so those kills go."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

ALLOC_TENSOR = "relax.memory.alloc_tensor"
KILL_TENSOR = "relax.memory.kill_tensor"
RESHAPE = "relax.reshape"


def _is_call(value, op_name: str) -> bool:
    return isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get(op_name))


def _static_offset(expr) -> bool:
    return isinstance(expr, tvm.tirx.IntImm)


def _same_view(a: relax.Call, b: relax.Call) -> bool:
    """Same storage variable, offset, shape, dtype and device (the calls' inferred types
    may differ in how far they were normalized, so compare arguments only)."""
    return a.args[0].same_as(b.args[0]) and all(
        tvm_ffi.structural_equal(x, y) for x, y in zip(a.args[1:], b.args[1:], strict=True))


@mutator
class _ViewSharer(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.views: dict[relax.Var, relax.Call] = {}  # emitted view var → its alloc_tensor
        self.canonical: list[tuple[relax.Call, relax.Var]] = []

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        if isinstance(value, relax.Var) and value in self.views:  # `lv = alloc`: an alias
            self.set_var_remap(binding.var, value)
            return
        if _is_call(value, RESHAPE) and isinstance(value.args[0], relax.Var) \
                and value.args[0] in self.views and isinstance(value.args[1], relax.ShapeExpr):
            storage, offset, _, dtype, device = self.views[value.args[0]].args
            value = relax.op.memory.alloc_tensor(storage, offset, value.args[1], dtype, device)
        if _is_call(value, ALLOC_TENSOR) and _static_offset(value.args[1]):
            for call, var in self.canonical:
                if _same_view(call, value):
                    self.set_var_remap(binding.var, var)
                    return
            var = self.builder_.emit(value, binding.var.name)
            self.set_var_remap(binding.var, var)
            self.views[var] = value
            self.canonical.append((value, var))
            return
        super().visit_var_binding_(binding)

    def visit_function_(self, func):
        self.views.clear()
        self.canonical.clear()
        return super().visit_function_(func)


@mutator
class _ParamKillDropper(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.param_items: set[relax.Var] = set()
        self.params: set[relax.Var] = set()

    def visit_function_(self, func):
        self.params = set(func.params)
        self.param_items.clear()
        return super().visit_function_(func)

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.params:
            self.param_items.add(binding.var)
        if _is_call(value, KILL_TENSOR) and value.args[0] in self.param_items:
            return
        super().visit_var_binding_(binding)


def _each_function(rewriter_type, mod: tvm.IRModule) -> tvm.IRModule:
    rewriter = rewriter_type(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return mod


@tvm.transform.module_pass(opt_level=0, name="ShareViews")
class ShareViews:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _each_function(_ViewSharer, mod)


@tvm.transform.module_pass(opt_level=0, name="DropParamKills")
class DropParamKills:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _each_function(_ParamKillDropper, mod)
