"""Mark every kernel `dlight.do_not_tensorize` before dlight's GPU rules run."""

from __future__ import annotations

import tvm
from tvm import tirx


@tvm.transform.module_pass(opt_level=0, name="MarkNoTensorize")
class MarkNoTensorize:
    """dlight's Matmul rule tensorizes fp16 matmuls for tensor cores on sm_70+, and
    `Schedule.tensorize` segfaults in the 0.27 wheel (shared/docs/tvm-field-notes.md); the
    attribute makes the rule schedule with plain CUDA cores instead."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and "dlight.do_not_tensorize" not in \
                    (func.attrs or {}):
                mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
        return mod
