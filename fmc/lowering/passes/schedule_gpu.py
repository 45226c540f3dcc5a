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


@contextlib.contextmanager
def _no_simdgroup_matmul():
    from tvm.s_tir.dlight.gpu import matmul

    with mock.patch.object(matmul, "MetalMatmul", _DeclineSimdgroupMatmul):
        yield


@tvm.transform.module_pass(opt_level=0, name="DlightGPUSchedule")
class DlightGPUSchedule:
    """dlight's default GPU rules in order: Matmul, GEMV, Reduction, GeneralReduction, and
    Fallback for everything else (elementwise, gathers)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from tvm.s_tir import dlight

        gpu = dlight.gpu
        apply = dlight.ApplyDefaultSchedule(gpu.Matmul(), gpu.GEMV(), gpu.Reduction(),
                                            gpu.GeneralReduction(), gpu.Fallback())
        with _no_simdgroup_matmul():
            return apply(mod)


def gpu_schedule_passes() -> list:
    return [("no-tensorize", "keep dlight off tensor-core intrinsics (crash in 0.27)",
             MarkNoTensorize()),
            ("dlight", "dlight GPU rules: matmul, GEMV, reductions, fallback",
             DlightGPUSchedule())]
