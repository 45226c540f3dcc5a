"""Read-only helpers over TIR functions (the 0.27 wheel exposes no TIR visitor to Python)."""

from __future__ import annotations

from tvm import s_tir, tirx


def block_names(func: tirx.PrimFunc) -> list[str]:
    """Names of every block of `func` (depth first, root excluded); none for a kernel
    written as plain loops (no root block: fmc's hand-scheduled kernels)."""
    schedule = s_tir.Schedule(func)
    names: list[str] = []
    try:
        root = schedule.get_sblock("root")
    except s_tir.ScheduleError:
        return names
    pending = list(schedule.get_child_blocks(root))
    while pending:
        block = pending.pop(0)
        names.append(schedule.get(block).name_hint)
        pending.extend(schedule.get_child_blocks(block))
    return names
