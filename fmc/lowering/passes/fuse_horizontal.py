"""Horizontal fusion: matmuls that read the same input become one matmul and a split.

q/k/v (and gate/up) projections of a layer all multiply the same normalised hidden state. The
pass concatenates their weights — plain or quantized storage, part by part along the rows —
into one new parameter, emits one (dequantize →) matmul (→ bias add), and splits the result.
The parameter list changes for every entry function; the stored-parameter plan the module
carries (fmc.lowering.param_plan) is rewritten so the artifact's shards hold the fused
tensors, each recording the checkpoint tensors and row ranges it is made of. A module
without a plan (built outside the compiler) is left as it is."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from fmc.lowering import param_plan
from fmc.quant import registry
from fmc.quant.modules import SCHEME_ATTR
from fmc.quant.stored import StoredParam

PACKED = "packed_params"


@dataclass
class Member:
    """One matmul of a group: where its weight parts and bias come from."""

    matmul: relax.Var  # the matmul binding (or its bias add when there is one)
    raw_matmul: relax.Var
    weight_parts: tuple[int, ...]  # param indices of the stored parts, in storage order
    bias: int | None
    rows: int
    skipped: tuple[relax.Var, ...]  # bindings replaced by the fused computation
    x: relax.Expr = None  # the shared input


def _packed_param(func: relax.Function) -> relax.Var | None:
    for param in func.params:
        if param.name == PACKED:
            return param
    return None


def _vars_in(expr: relax.Expr) -> list[relax.Var]:
    """Every variable occurrence in `expr` (dataflow vars included, unlike free_vars)."""
    found = []
    relax.analysis.post_order_visit(
        expr, lambda node: found.append(node) if isinstance(node, relax.Var) else None)
    return found


def _bindings(func: relax.Function):
    for block in func.body.blocks:
        yield from block.bindings


class _Analysis:
    """Matmul candidates of one function and how often each parameter index is used."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        packed = _packed_param(func)
        self.index: dict[relax.Var, int] = {}
        values = {}
        uses: dict[relax.Var, int] = defaultdict(int)
        for binding in _bindings(func):
            value = binding.value
            values[binding.var] = value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(packed):
                self.index[binding.var] = value.index
            for var in _vars_in(value):
                uses[var] += 1
        self.uses = uses
        self.groups: dict[tuple, list[Member]] = defaultdict(list)
        for binding in _bindings(func):
            member = self._member(mod, binding, values)
            if member is not None:
                key, item = member
                self.groups[key].append(item)

    def _member(self, mod, binding, values):
        value = binding.value
        if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.matmul")):
            return None
        x, transposed = value.args
        perm = values.get(transposed)
        if not (isinstance(perm, relax.Call) and perm.op == tvm.ir.Op.get("relax.permute_dims")
                and perm.attrs.axes is None and self.uses[transposed] == 1):
            return None
        weight = perm.args[0]
        skipped = [transposed]
        if weight in self.index:
            parts, kind = (self.index[weight],), ("plain", str(weight.ty.dtype))
            skipped.append(weight)
        else:
            call = values.get(weight)
            if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.call_tir")
                    and self.uses[weight] == 1):
                return None
            kernel = mod[call.args[0]]
            scheme = kernel.attrs.get(SCHEME_ATTR) if kernel.attrs else None
            args = list(call.args[1].fields)
            if scheme is None or not all(a in self.index for a in args):
                return None
            parts = tuple(self.index[a] for a in args)
            kind = ("dequantize", str(scheme), str(weight.ty.dtype))
            skipped += [weight, *args]
        k = int(weight.ty.shape.values[1])
        rows = int(weight.ty.shape.values[0])
        if any(self.uses[a] != 1 for a in skipped if a in self.index):
            return None
        return (x, kind, k), Member(binding.var, binding.var, parts, None, rows, tuple(skipped), x)

    def attach_biases(self, func: relax.Function) -> None:
        """A member whose only use is `add(matmul, bias param)` carries the bias along."""
        adds = {}
        for binding in _bindings(func):
            value = binding.value
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.add"):
                a, b = value.args
                if b in self.index and self.uses[b] == 1:
                    adds[a] = (binding.var, self.index[b], b)
        for members in self.groups.values():
            for member in members:
                if member.raw_matmul in adds and self.uses[member.raw_matmul] == 1:
                    var, index, bias_var = adds[member.raw_matmul]
                    member.matmul, member.bias = var, index
                    member.skipped = (*member.skipped, member.raw_matmul, bias_var)


def _fusable(groups: dict[tuple, list[Member]]) -> list[list[Member]]:
    """Groups of two or more where every member agrees on having a bias."""
    out = []
    for members in groups.values():
        if len(members) >= 2 and len({m.bias is None for m in members}) == 1:
            out.append(members)
    return out


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, packed_old, packed_new, remap, groups, layouts):
        super().__init__(mod)
        self.packed_old, self.packed_new = packed_old, packed_new
        self.remap = remap  # old param index → new index (absent: fused away)
        self.skip = {v for g in groups for m in g for v in m.skipped}
        self.member_of = {m.matmul: (g, i) for g in groups for i, m in enumerate(g)}
        # first member's var → new param indices of the fused parts, bias, dequantize kernel
        self.layouts = {g[0].matmul: layout for g, layout in zip(groups, layouts, strict=True)}
        self.split_items = {}

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(self.packed_old):
            if value.index in self.remap:
                new = self.builder_.emit(relax.TupleGetItem(self.packed_new,
                                                            self.remap[value.index]), var.name)
                self.set_var_remap(var, new)
            return
        if var in self.skip:
            return
        if var in self.member_of:
            group, position = self.member_of[var]
            if group[0].matmul not in self.split_items:
                self.split_items[group[0].matmul] = self._emit_fused(group)
            self.set_var_remap(var, self.split_items[group[0].matmul][position])
            return
        super().visit_var_binding_(binding)

    def _emit_fused(self, group: list[Member]) -> list[relax.Var]:
        first = group[0]
        parts_new = self.layouts[first.matmul]
        weights = [self.builder_.emit(relax.TupleGetItem(self.packed_new, i), "fused_weight")
                   for i in parts_new["weight"]]
        x = self.visit_expr(first.x)
        if parts_new["dequantize"] is not None:
            gv, sinfo = parts_new["dequantize"]
            weight = self.builder_.emit(relax.call_tir(gv, weights, sinfo), "fused_dequantize")
        else:
            (weight,) = weights
        transposed = self.builder_.emit(relax.op.permute_dims(weight), "fused_transpose")
        out = self.builder_.emit(relax.op.matmul(x, transposed), "fused_matmul")
        if parts_new["bias"] is not None:
            bias = self.builder_.emit(relax.TupleGetItem(self.packed_new, parts_new["bias"]),
                                      "fused_bias")
            out = self.builder_.emit(relax.op.add(out, bias), "fused_add")
        bounds, total = [], 0
        for member in group[:-1]:
            total += member.rows
            bounds.append(total)
        pieces = self.builder_.emit(relax.op.split(out, bounds, axis=-1), "fused_split")
        return [self.builder_.emit(relax.TupleGetItem(pieces, i), "split")
                for i in range(len(group))]


@tvm.transform.module_pass(opt_level=0, name="FuseHorizontal")
class FuseHorizontal:
    def __init__(self, ctx):
        self.ctx = ctx  # fmc.lowering.PassContext

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        params = param_plan.read(mod)
        if params is None:
            return mod
        functions = {gv: f for gv, f in mod.functions_items()
                     if isinstance(f, relax.Function) and _packed_param(f) is not None}
        analyses = {}
        for gv, func in functions.items():
            analysis = _Analysis(mod, func)
            analysis.attach_biases(func)
            analyses[gv] = analysis
        # A group is fused only when every function that uses its parameters agrees.
        plans: dict[tuple, list[Member]] = {}
        votes: dict[tuple, int] = defaultdict(int)
        users: dict[int, int] = defaultdict(int)
        for analysis in analyses.values():
            for index in {i for var, i in analysis.index.items() if analysis.uses[var]}:
                users[index] += 1
            for members in _fusable(analysis.groups):
                key = tuple((m.weight_parts, m.bias) for m in members)
                votes[key] += 1
                plans.setdefault(key, members)
        chosen = [key for key in votes
                  if all(votes[key] == users[i] for parts, bias in key for i in parts)]
        if not chosen:
            return mod
        return self._apply(mod, list(params), functions, analyses, chosen, plans)

    def _apply(self, mod, params, functions, analyses, chosen, plans):
        old_sinfo = list(_packed_param(next(iter(functions.values()))).ty.fields)
        fused_params, removed = [], set()
        for key in chosen:
            members = plans[key]
            fused_params.append(self._fused_stored_params(params, old_sinfo, members))
            for parts, bias in key:
                removed.update(parts)
                if bias is not None:
                    removed.add(bias)
        keep = [i for i in range(len(params)) if i not in removed]
        new_params = [params[i] for i in keep]
        new_sinfo = [old_sinfo[i] for i in keep]
        remap = {old: new for new, old in enumerate(keep)}
        layout = {}
        builder = relax.BlockBuilder(mod)
        for key, (stored, sinfos, scheme, out_dtype) in zip(chosen, fused_params, strict=True):
            start = len(new_params)
            new_params += stored
            new_sinfo += sinfos
            weight_count = len(stored) - (1 if key[0][1] is not None else 0)
            dequant = None
            if scheme is not None:
                shapes = [s.shape for s in stored[:weight_count]]
                dtypes = [s.dtype for s in stored[:weight_count]]
                dequant = _dequantize_kernel(builder, scheme, shapes, dtypes, out_dtype)
            layout[key] = {"weight": list(range(start, start + weight_count)),
                           "bias": start + weight_count if weight_count < len(stored) else None,
                           "dequantize": dequant}
        mod = builder.get()
        for gv, func in functions.items():
            func = mod[gv]
            analysis = _Analysis(mod, func)
            analysis.attach_biases(func)
            groups = [g for g in _fusable(analysis.groups)
                      if tuple((m.weight_parts, m.bias) for m in g) in layout]
            old = _packed_param(func)
            new = relax.Var(PACKED, relax.TupleType(new_sinfo))
            layouts = [layout[tuple((m.weight_parts, m.bias) for m in g)] for g in groups]
            rewriter = _Rewriter(mod, old, new, remap, groups, layouts)
            body = rewriter.visit_expr(func.body)
            params_new = [new if p.same_as(old) else p for p in func.params]
            mod[gv] = relax.Function(params_new, body, func.ret_ty, func.is_pure,
                                     func.attrs)
        mod = relax.transform.DeadCodeElimination(list(self.ctx.entry_functions))(mod)
        return param_plan.attach(mod, new_params)

    def _fused_stored_params(self, params, sinfos, members):
        """The StoredParams (and struct infos) of a group's concatenated parts and bias."""
        first = params[members[0].weight_parts[0]]
        stored, new_sinfo = [], []
        count = len(members[0].weight_parts)
        for part in range(count):
            pieces = [params[m.weight_parts[part]] for m in members]
            stored.append(_concatenated(pieces))
            new_sinfo.append(_concat_sinfo([sinfos[m.weight_parts[part]] for m in members]))
        if members[0].bias is not None:
            pieces = [params[m.bias] for m in members]
            stored.append(_concatenated(pieces))
            new_sinfo.append(_concat_sinfo([sinfos[m.bias] for m in members]))
        scheme = registry.get(first.scheme) if first.scheme else None
        out_dtype = self.ctx.compute_dtype
        return stored, new_sinfo, scheme, out_dtype


def _concatenated(pieces: list[StoredParam]) -> StoredParam:
    """A StoredParam made of `pieces` stacked along axis 0."""
    names = [p.name for p in pieces]
    prefix = _common_prefix(names)
    suffix = names[0].rsplit(".", 1)[1]
    middle = "+".join(n[len(prefix):].rsplit(".", 1)[0] for n in names)
    rows = sum(p.shape[0] for p in pieces)
    return replace(pieces[0], name=f"{prefix}{middle}.{suffix}",
                   shape=(rows, *pieces[0].shape[1:]), members=tuple(pieces))


def _common_prefix(names: list[str]) -> str:
    first = names[0].split(".")
    prefix = []
    for index, part in enumerate(first):
        if all(n.split(".")[index] == part for n in names[1:]):
            prefix.append(part)
        else:
            break
    return ".".join(prefix) + "." if prefix else ""


def _concat_sinfo(sinfos):
    shape = [int(d) for d in sinfos[0].shape.values]
    shape[0] = sum(int(s.shape.values[0]) for s in sinfos)
    return relax.TensorType(shape, sinfos[0].dtype)


def _dequantize_kernel(builder, scheme, shapes, dtypes, out_dtype):
    # int64 extents, as the kernels Relax legalizes itself use (FuseTIR compares buffer types)
    placeholders = [te.placeholder([tirx.IntImm("int64", d) for d in shape], dtype,
                                   name=f"part{i}")
                    for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))]
    out = scheme.dequantize_te(placeholders, out_dtype)
    # Private (no global symbol), so dead-code elimination drops it once it is fused away.
    func = te.create_prim_func([*placeholders, out]).with_attr(SCHEME_ATTR, scheme.name)
    func = func.without_attr("global_symbol")
    gv = builder.add_func(func, f"dequantize_{scheme.name}")
    return gv, relax.TensorType([int(d) for d in out.shape], out_dtype)
