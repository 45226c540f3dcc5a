"""A first CPU schedule for matmul kernels: parallel over outputs, SIMD over the reduction."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from fmc.lowering.tir_util import block_names

LANES = 16  # float32 lanes of a 512-bit vector


def _const_extent(schedule: s_tir.Schedule, loop) -> int | None:
    extent = schedule.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _is_reduction(schedule: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in schedule.get(block).iter_vars)


def _schedule_one_matmul(schedule: s_tir.Schedule, name: str, following: list[str],
                         lanes: int) -> None:
    """Parallel outputs and a SIMD reduction for the matmul block `name`; the elementwise
    blocks right after it (its epilogue: bias, residual add, casts) join its output loop."""
    block = schedule.get_sblock(name)
    *spatial, reduction = schedule.get_loops(block)
    if not spatial:
        return
    outer = schedule.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    k_extent = _const_extent(schedule, reduction)
    partial = chunk = None
    if k_extent is not None and k_extent % lanes == 0:
        _, inner = schedule.split(reduction, factors=[None, lanes])
        partial = schedule.rfactor(inner, factor_axis=0)
        # rfactor leaves the final sum in a loop nest of its own: nest the partial sums
        # under its output loop so the [lanes] accumulator is per output element.
        outer = schedule.get_loops(block)[0]
        schedule.compute_at(partial, outer)
        _, lane, chunk = schedule.get_loops(partial)
        schedule.reorder(chunk, lane)
        schedule.vectorize(lane)
    for epilogue in following:
        consumer = schedule.get_sblock(epilogue)
        if "matmul" in epilogue or _is_reduction(schedule, consumer):
            break
        try:
            schedule.reverse_compute_at(consumer, outer)
        except s_tir.ScheduleError:
            break  # not over the matmul's output space: it stays a loop nest of its own
    schedule.parallel(outer)
    if partial is not None:  # after `parallel`, which needs the reduction block whole
        schedule.decompose_reduction(partial, chunk)


def schedule_matmul(func: tirx.PrimFunc, lanes: int = LANES) -> tirx.PrimFunc | None:
    """Schedule every matmul block of the kernel (merged kernels hold several: GEMM→norm→
    GEMM) or return None when it has none.

    Each output element is a dot product: the reduction is split into `lanes`-wide chunks
    accumulated in a vector (rfactor), summed once at the end; output elements are spread
    over threads. Dequantize expressions are already inlined, so weights are decoded in
    registers. Blocks between matmuls (a norm's reduction) run as they are."""
    names = block_names(func)
    matmuls = [n for n in names if "matmul" in n]
    if not matmuls:
        return None
    schedule = s_tir.Schedule(func)
    for name in matmuls:
        _schedule_one_matmul(schedule, name, names[names.index(name) + 1:], lanes)
    return schedule.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPUMatmul")
class ScheduleCPUMatmul:
    """Apply `schedule_matmul` to every kernel with a matmul block; leave the rest."""

    def __init__(self, lanes: int = LANES):
        self.lanes = lanes  # float32 lanes of the target's widest vector

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            scheduled = schedule_matmul(func, self.lanes)
            if scheduled is not None:
                mod[gv] = scheduled.with_attr("global_symbol", gv.name_hint) \
                    if "global_symbol" in (func.attrs or {}) else scheduled
        return mod
