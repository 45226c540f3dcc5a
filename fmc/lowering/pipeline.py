"""The IR pipeline: named passes of the `fuse` and `lower` phases, in order, in one place.

Each entry is a `PassSpec`: a name users can list, disable or dump after, a one-line doc,
and a factory that builds the TVM pass from a `PassContext` — the read-only facts of one
compile (target, activation dtype, entry functions, kernel overrides). A pass changes the
module only; one that changes the parameter list records the new plan on the module
(fmc.lowering.param_plan)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from fmc.errors import UsageError, take_pass_error
from fmc.lowering import param_plan
from fmc.lowering.passes.canonical_shape_funcs import CanonicalShapeFuncs
from fmc.lowering.passes.fuse_dequantize_matmul import FuseDequantizeMatmul
from fmc.lowering.passes.fuse_horizontal import FuseHorizontal
from fmc.lowering.passes.fuse_norm import FuseAddNorm, FuseNormMatmul
from fmc.lowering.passes.inline_dequantize import InlineDequantize
from fmc.lowering.passes.mark_noalias import MarkNoAlias
from fmc.lowering.passes.override_kernels import OverrideKernels
from fmc.lowering.passes.share_views import DropParamKills, ShareViews
from fmc.lowering.passes.simplify_copies import SimplifyCopies

if TYPE_CHECKING:
    from fmc.targets import Target


@dataclass(frozen=True)
class PassContext:
    """What a pass may know about the compile, frozen (not TVM's `tvm.transform.PassContext`).
    The stored-parameter plan is not here: it travels on the module (`param_plan`)."""

    target: Target
    compute_dtype: str  # activations and KV cache
    entry_functions: tuple[str, ...]  # what dead-code elimination keeps
    override_kernels: tuple[str, ...] = ()  # --override-kernel "[ENTRY/]KERNEL=FILE"


@dataclass(frozen=True)
class PassSpec:
    name: str
    phase: str  # "fuse" or "lower"
    doc: str
    make: Callable[[PassContext], tvm.transform.Pass]
    # Passes whose removal would produce an unbuildable module cannot be disabled.
    required: bool = False
    # Opt-in passes (--enable-pass) are legal but do not pay on every target yet.
    default: bool = True


def _relax(factory: Callable[[], tvm.transform.Pass]) -> Callable[[PassContext],
                                                                 tvm.transform.Pass]:
    return lambda ctx: factory()


def _entry_dce(ctx: PassContext) -> tvm.transform.Pass:
    return relax.transform.DeadCodeElimination(list(ctx.entry_functions))


def _target_kernels(ctx: PassContext) -> tvm.transform.Pass:
    return tvm.transform.Sequential(ctx.target.kernel_passes(), name="target-kernels")


def _schedule(ctx: PassContext) -> tvm.transform.Pass:
    passes = [p for _, _, p in ctx.target.schedule_passes()]
    return tvm.transform.Sequential(passes, name="schedule")


PIPELINE: list[PassSpec] = [
    PassSpec("fuse-horizontal", "fuse",
             "one matmul (and weight) for projections of the same input: q/k/v, gate/up",
             lambda ctx: FuseHorizontal(ctx)),
    PassSpec("simplify-copies", "fuse",
             "drop pure copies: concat(split(x)) → x, reshape(reshape(x)) → reshape(x)",
             _relax(SimplifyCopies)),
    PassSpec("fuse-transpose-matmul", "fuse",
             "compute x·Wᵀ straight from the [out, in] weight instead of transposing it first",
             _relax(relax.transform.FuseTransposeMatmul)),
    PassSpec("legalize", "fuse", "lower every Relax operator to a TIR kernel (LegalizeOps)",
             _relax(relax.transform.LegalizeOps), required=True),
    PassSpec("annotate-patterns", "fuse",
             "classify kernels (elementwise, injective, reduction) for fusion",
             _relax(relax.transform.AnnotateTIROpPattern), required=True),
    PassSpec("fold-constants", "fuse", "evaluate kernels whose inputs are all constants",
             _relax(relax.transform.FoldConstant)),
    PassSpec("fuse-ops", "fuse",
             "group producer→consumer kernels (e.g. transpose→matmul→add) into one",
             _relax(relax.transform.FuseOps)),
    PassSpec("fuse-tir", "fuse", "merge each fused group into a single TIR kernel",
             _relax(relax.transform.FuseTIR), required=True),
    PassSpec("fuse-dequantize-matmul", "fuse",
             "put each dequantize kernel into the matmul kernel that consumes it",
             lambda ctx: FuseDequantizeMatmul()),
    PassSpec("inline-dequantize", "fuse",
             "decode quantized weights inside the consuming loop (no float copy in memory)",
             lambda ctx: InlineDequantize()),
    PassSpec("target-kernels", "fuse",
             "swap fused kernels for the target's own (CPU: integer-dot decode GEMVs for "
             "4-bit weights, --cpu-dot)", _target_kernels),
    PassSpec("fuse-norm-matmul", "fuse",
             "GEMM→norm→GEMM: each RMSNorm becomes the first stage of the matmul reading it",
             lambda ctx: FuseNormMatmul(), default=False),
    PassSpec("fuse-add-norm", "fuse",
             "residual add (a matmul's epilogue) + the next RMSNorm in one kernel",
             lambda ctx: FuseAddNorm()),
    PassSpec("dead-code", "fuse", "drop functions and bindings the entry functions never use",
             _entry_dce),
    PassSpec("schedule", "lower", "apply the target's kernel schedules (loops, threads, SIMD)",
             _schedule),
    PassSpec("override-kernels", "lower",
             "swap in users' kernels given with --override-kernel (signature-checked)",
             lambda ctx: OverrideKernels(list(ctx.override_kernels))),
    PassSpec("rewrite-dataflow-reshape", "lower", "turn reshapes into views",
             _relax(relax.transform.RewriteDataflowReshape)),
    PassSpec("to-non-dataflow", "lower", "leave the dataflow form",
             _relax(relax.transform.ToNonDataflow), required=True),
    PassSpec("remove-purity-checking", "lower", "drop purity annotations before VM lowering",
             _relax(relax.transform.RemovePurityChecking), required=True),
    PassSpec("call-tir-rewrite", "lower", "make kernel outputs explicit allocations",
             _relax(relax.transform.CallTIRRewrite), required=True),
    PassSpec("plan-memory", "lower", "reuse intermediate buffers across kernels (static plan)",
             _relax(relax.transform.StaticPlanBlockMemory)),
    PassSpec("lower-alloc", "lower", "lower allocations to VM builtins",
             _relax(relax.transform.LowerAllocTensor), required=True),
    PassSpec("share-views", "lower",
             "one tensor object per distinct view of planned memory; reshapes of views are "
             "views (fewer VM builtin calls per step)", _relax(ShareViews)),
    PassSpec("kill-after-last-use", "lower", "free intermediates as soon as they die",
             _relax(relax.transform.KillAfterLastUse)),
    PassSpec("drop-param-kills", "lower",
             "no kill calls for parameter-tuple elements (they free nothing)",
             _relax(DropParamKills)),
    PassSpec("lower-runtime-builtin", "lower", "lower remaining ops to VM builtins",
             _relax(relax.transform.LowerRuntimeBuiltin), required=True),
    PassSpec("compute-prim-value", "lower", "compute symbolic scalars on the host",
             _relax(relax.transform.ComputePrimValue), required=True),
    PassSpec("vm-shape-lower", "lower", "lower symbolic shape checks and arithmetic for the VM",
             _relax(relax.transform.VMShapeLower), required=True),
    PassSpec("canonical-shape-funcs", "lower",
             "fixed store order in the VM's shape functions (reproducible libraries)",
             _relax(CanonicalShapeFuncs)),
    PassSpec("attach-global-symbol", "lower", "name every function for the library",
             _relax(relax.transform.AttachGlobalSymbol), required=True),
    PassSpec("mark-noalias", "lower",
             "declare kernels' buffers distinct, so LLVM keeps accumulators in registers",
             _relax(MarkNoAlias)),
]


def pass_names() -> list[str]:
    return [p.name for p in PIPELINE]


def register_pass(spec: PassSpec, *, before: str | None = None, after: str | None = None,
                  replace: str | None = None) -> PassSpec:
    """Add a pass at a named position (exactly one of before/after/replace), or replace the
    pass of the same name in place. Pass plugins call this; see docs/design.md."""
    if spec.phase not in ("fuse", "lower"):
        raise UsageError(f"pass {spec.name!r}: phase must be 'fuse' or 'lower', "
                         f"got {spec.phase!r}")
    anchors = [a for a in (before, after, replace) if a is not None]
    if len(anchors) > 1:
        raise UsageError(f"pass {spec.name!r}: give one of before=, after=, replace=")
    existing = pass_names()
    if not anchors:
        if spec.name not in existing:
            raise UsageError(f"pass {spec.name!r}: a new pass needs before=, after= or "
                             "replace=")
        PIPELINE[existing.index(spec.name)] = spec
        return spec
    anchor = anchors[0]
    if anchor not in existing:
        from fmc.errors import unknown_choice

        raise unknown_choice("pass", anchor, existing)
    if spec.name in existing and spec.name != anchor:
        del PIPELINE[existing.index(spec.name)]
    index = pass_names().index(anchor)
    if replace is not None:
        PIPELINE[index] = spec
    else:
        PIPELINE.insert(index + (1 if after is not None else 0), spec)
    return spec


def load_pass_plugin(path: str | Path) -> list[str]:
    """Import a user's file that calls `register_pass`; returns the pass names it changed."""
    from fmc.errors import InputError
    from fmc.plugins import import_file

    before = list(PIPELINE)
    import_file(path, "pass plugin")
    changed = [p.name for p in PIPELINE if p not in before]
    if not changed:
        raise InputError(f"{path}: registers no pass (call fmc.lowering.register_pass)")
    return changed


def resolve_disabled(disabled: list[str], enabled: list[str] = (),
                     target_defaults: dict[str, str] | None = None) -> set[str]:
    """The passes to skip: those disabled, the opt-in ones not enabled, and those the target
    skips by default (`Target.default_disabled_passes`) unless enabled."""
    from fmc.errors import unknown_choice

    specs = {p.name: p for p in PIPELINE}
    for name in [*disabled, *enabled]:
        if name not in specs:
            raise unknown_choice("pass", name, sorted(specs))
    for name in disabled:
        if specs[name].required:
            raise UsageError(f"pass {name!r} is required to produce a library and cannot be "
                             "disabled")
        if name in enabled:
            raise UsageError(f"pass {name!r} is both enabled and disabled")
    off_by_default = {p.name for p in PIPELINE if not p.default} | set(target_defaults or {})
    return set(disabled) | (off_by_default - set(enabled))


class IRDumper:
    """Writes TVMScript after each pass as NN-phase-pass.py, numbered in pipeline order."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.count = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("[0-9][0-9]-*.py"):  # dumps of an earlier compile
                stale.unlink()

    def dump(self, phase: str, name: str, mod: tvm.IRModule) -> None:
        if self.directory is None:
            return
        path = self.directory / f"{self.count:02d}-{phase}-{name}.py"
        text = param_plan.strip(mod).script(show_meta=False)  # the plan is not IR to read
        path.write_text(text, encoding="utf-8")
        self.count += 1


def run_phase(phase: str, mod: tvm.IRModule, ctx: PassContext, disabled: set[str],
              dumper: IRDumper) -> tvm.IRModule:
    """Run the enabled passes of `phase` in order, dumping the IR after each. The module's
    stored-parameter plan is kept through passes that rebuild the module without its
    attributes (a pass that changes the plan writes a new one)."""
    with ctx.target.tvm_target():
        for spec in PIPELINE:
            if spec.phase != phase or spec.name in disabled:
                continue
            plan = mod.get_attr(param_plan.ATTR)
            try:
                mod = spec.make(ctx)(mod)
                if plan is not None and mod.get_attr(param_plan.ATTR) is None:
                    mod = mod.with_attr(param_plan.ATTR, plan)
            except Exception as exc:
                original = take_pass_error()
                if original is not None:
                    raise original from None
                exc.fmc_pass = spec.name  # named in a code generator failure (exit 8)
                raise
            dumper.dump(phase, spec.name, mod)
    return mod
