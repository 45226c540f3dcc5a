"""Inline dequantize blocks into their consumers, so weights are decoded in registers."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from fmc.lowering.passes.fuse_dequantize_matmul import DEQUANTIZE_PREFIX
from fmc.lowering.tir_util import block_names


def _dequantize_blocks(func: tirx.PrimFunc) -> list[str]:
    return [name for name in block_names(func) if name.startswith(DEQUANTIZE_PREFIX)]


@tvm.transform.module_pass(opt_level=0, name="InlineDequantize")
class InlineDequantize:
    """In every kernel that both dequantizes and consumes the result (the output of
    FuseDequantizeMatmul, or an embedding lookup), compute_inline the dequantize block: the
    consumer then reads packed codes and scales directly and no float copy of the weight
    exists. A dequantize block that writes a kernel output is left alone."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            names = _dequantize_blocks(func)
            if not names:
                continue
            schedule = s_tir.Schedule(func)
            changed = False
            for name in names:
                try:
                    schedule.compute_inline(schedule.get_sblock(name))
                    changed = True
                except s_tir.ScheduleError:
                    pass  # the block writes the kernel's output: nothing to inline into
            if changed:
                updates[gv] = schedule.mod["main"].with_attrs(func.attrs) \
                    if func.attrs else schedule.mod["main"]
        for gv, func in updates.items():
            mod[gv] = func
        return mod
