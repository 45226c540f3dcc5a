"""GPU kernel schedules from TVM's dlight rules, with the two workarounds the 0.27 wheel needs
(docs/targets.md): no tensor-core tensorization (Schedule.tensorize crashes), no Metal
simdgroup matmul."""

from __future__ import annotations

import contextlib
from unittest import mock

import tvm
from tvm import tirx

# Fusions whose kernels dlight's GPU rules cannot schedule (GPU targets skip them by default).
DLIGHT_UNSUPPORTED_PASSES = {
    "inline-dequantize": "dlight's matmul rule does not match packed-code reads; it inlines "
                         "the dequantize itself",
    "fuse-add-norm": "dlight has no rule for a kernel with two reductions (it would run as "
                     "one serial thread)",
}

@tvm.transform.module_pass(opt_level=0, name="MarkNoTensorize")
class MarkNoTensorize:
    """dlight's Matmul rule tensorizes fp16 matmuls for tensor cores on sm_70+, and
    `Schedule.tensorize` segfaults in the 0.27 wheel; this attribute makes the rule schedule
    plain CUDA-core loops instead."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and "dlight.do_not_tensorize" not in \
                    (func.attrs or {}):
                mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
        return mod


class _DeclineSimdgroupMatmul:
    """Stands in for dlight's MetalMatmul, which reaches the crashing `tensorize` whatever the
    attributes say. dlight's Matmul rule calls it inside `try`, so raising here makes the
    rule fall through to its generic GPU matmul schedule."""

    def apply(self, *_args, **_kwargs):
        raise NotImplementedError("simdgroup matmul disabled by fmc (tensorize crashes in 0.27)")


class _DeclineTensorCoreMatmul:
    """Stands in for dlight's MatmulTensorization and MatmulInt8Tensorization. Their `apply`
    imports `tvm.s_tir.tensor_intrin` before it reads `dlight.do_not_tensorize`, and that
    import parses ~500 TVMScript intrinsics, each walking `inspect.stack()`: 55 s with torch
    loaded, over 300 s from deep inside a compile (measured on 2 cores, 2026-12-05) — most
    of a small GPU compile, for intrinsics fmc never uses."""

    def apply(self, *_args, **_kwargs):
        return None


@contextlib.contextmanager
def _no_simdgroup_matmul():
    """dlight's Matmul rule without its tensor-core and simdgroup variants."""
    from tvm.s_tir.dlight.gpu import matmul

    with mock.patch.object(matmul, "MetalMatmul", _DeclineSimdgroupMatmul), \
            mock.patch.object(matmul, "MatmulTensorization", _DeclineTensorCoreMatmul), \
            mock.patch.object(matmul, "MatmulInt8Tensorization", _DeclineTensorCoreMatmul):
        yield


class _DeclineOnAnalysisError:
    """Wraps a dlight rule: its pattern analysis asserts on reads whose index is data (a
    gathered weight, `fmc.nn_moe`'s expert matmul: `W[experts[t, j], i, k]`) instead of
    declining them; such a kernel is not the rule's pattern, so the next rule (in the end
    Fallback) schedules it."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except AssertionError:
            return None


@tvm.transform.module_pass(opt_level=0, name="DlightGPUSchedule")
class DlightGPUSchedule:
    """dlight's default GPU rules in order: Matmul, GEMV, Reduction, GeneralReduction, and
    Fallback for everything else (elementwise, gathers)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from tvm.s_tir import dlight

        gpu = dlight.gpu
        rules = [gpu.Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction()]
        apply = dlight.ApplyDefaultSchedule(*map(_DeclineOnAnalysisError, rules),
                                            gpu.Fallback())
        with _no_simdgroup_matmul():
            return apply(mod)


def gpu_schedule_passes() -> list:
    return [("no-tensorize", "keep dlight off tensor-core intrinsics (crash in 0.27)",
             MarkNoTensorize()),
            ("dlight", "dlight GPU rules: matmul, GEMV, reductions, fallback",
             DlightGPUSchedule())]
