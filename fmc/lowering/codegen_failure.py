"""A TVM failure in the fuse, lower or codegen phase, reported as fmc's own error.

fmc only hands TVM models it has validated, so a TVM exception there is TVM (or fmc's use of
it) failing on a valid model: exit 8, one line naming the kernel (when it can be found), the
target and the model's shape, never "internal error". The compile then unwinds like any
other error, so nothing is left at the output path. An exception raised by fmc's own Python
code (not inside TVM) stays an internal error: that is an fmc bug."""

from __future__ import annotations

import os
import re
from types import TracebackType

from fmc.errors import CodegenError, FmcError

PHASES = ("fuse", "lower", "codegen")


def _tvm_dirs() -> tuple[str, ...]:
    import tvm
    import tvm_ffi

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (tvm, tvm_ffi))


def raised_by_tvm(exc: BaseException) -> bool:
    """True when the exception comes from TVM: one of its error types, or raised in TVM's
    Python or C++ code (the innermost frame is in the tvm/tvm_ffi packages, or is not Python).
    A pass plugin's own TVM error counts; fmc's own Python bugs do not."""
    import tvm

    if isinstance(exc, (tvm.error.InternalError, tvm.error.DiagnosticError)):
        return True
    tb: TracebackType | None = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return not filename.endswith(".py") or filename.startswith(_tvm_dirs())


def describe_shape(state) -> str:
    """The model's shape as one rank computes it, and the scheme and ranks."""
    c = state.local_config
    parts = [f"{c.architecture}", f"hidden {c.hidden_size}",
             f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads",
             f"head_dim {c.head_dim}", f"MLP {c.intermediate_size}", f"vocab {c.vocab_size}"]
    plan = getattr(state, "plan", None)
    if plan is not None:
        parts.append(str(plan.describe().get("default") or ""))
    if state.ranks > 1:
        parts.append(f"--tensor-parallel {state.ranks} (per rank)")
    return ", ".join(p for p in parts if p)


def failing_kernel(state) -> str | None:
    """Find the kernel the target's TIR pipeline fails on by lowering each one alone (only
    on the failure path; no device compiler is run). None when every kernel lowers alone."""
    import tvm
    from tvm import tirx
    from tvm.tirx.build import split_host_device_mods

    mod = getattr(state, "mod", None)
    if not isinstance(mod, tvm.IRModule):
        return None
    target = state.target.tvm_target()
    name = state.target.build_options().get("tir_pipeline")
    host = target.host or target
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        try:
            with target:
                pipeline, finalize_host, finalize_device = (
                    tirx.get_tir_pipeline(name) if name else
                    tirx.get_default_tir_pipeline(target))
                single = tirx.transform.BindTarget(target.with_host(host))(
                    tvm.IRModule({gv: func}))
                host_mod, devices = split_host_device_mods(pipeline(single))
                finalize_host()(host_mod)
                for device_mod in devices.values():
                    finalize_device()(device_mod)
        except Exception:  # noqa: BLE001 - the first kernel that fails is the answer
            return gv.name_hint
    return None


def codegen_failure(state, phase: str, exc: Exception) -> FmcError | None:
    """The error to raise for `exc` in `phase`, or None to let it propagate unchanged."""
    if phase not in PHASES or isinstance(exc, FmcError) or not raised_by_tvm(exc):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])
    # TVM's messages start with a traceback or "Check failed"; keep the informative line.
    reason = next((line.strip() for line in reversed(first)
                   if line.strip() and not line.lstrip().startswith(("File ", "at ", "  "))),
                  type(exc).__name__)
    reason = re.sub(r" for target \{.*\}", "", reason)  # the target's JSON: named below
    kernel = None
    if phase == "codegen":
        try:
            kernel = failing_kernel(state)
        except Exception:  # noqa: BLE001 - naming the kernel is best effort
            kernel = None
    where = f"kernel {kernel!r}" if kernel else f"pass {exc.fmc_pass!r}" \
        if getattr(exc, "fmc_pass", None) else "the module"
    try:
        shape = describe_shape(state)
    except Exception:  # noqa: BLE001
        shape = "unknown shape"
    try:
        target = state.target.describe().get("spec") or state.target.name
    except Exception:  # noqa: BLE001
        target = state.target.name
    plugins = list(getattr(state.options, "pass_plugins", None) or [])
    blame = (f"a pass plugin may be at fault ({', '.join(map(str, plugins))})" if plugins
             else "this is a TVM limitation on a valid model, not a problem with the input: "
             "please report it")
    return CodegenError(
        f"the {target} code generator failed in the {phase} phase on {where} "
        f"({shape}): {type(exc).__name__}: {reason[:300]}; {blame}")
