"""CPU schedules for matmul kernels.

Weights stored row-interleaved (fmc.quant.layout, the CPU target's choice): each SIMD lane
owns one weight row. A task is a few row blocks; the reduction runs word by word with every
code of a packed word unrolled (a uniform shift), the activation value is a broadcast scalar,
the scales a vector load, and the accumulators stay in registers. Decode (one token) is a
GEMV over those tasks; in prefill the tokens loop inside each word, so a word's decoded
weights, kept in registers, feed every token's FMAs.

Other weights (row-major: f32 kept as is, rows not divisible by the block): parallel over
outputs, each dot product split into SIMD-wide partial sums (rfactor).

The grouped expert GEMM (fmc.nn_moe, stage GROUPED_STAGE: [blocks, rows, out], every row of
a block against one expert's weight): parallel over (block, output), the rows of a block
unrolled inside each SIMD chunk of the reduction, so one decoded weight vector feeds all of
their FMAs."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from fmc.lowering.tir_util import block_names
from fmc.nn_moe import GROUPED_STAGE

LANES = 16  # float32 lanes of a 512-bit vector
# Row-interleaved weights (fmc.quant.layout): row blocks per parallel task. Decode: 4 blocks
# = 4 independent FMA chains. Prefill: 2 blocks × 8 codes = 16 decoded weight vectors held in
# registers while the tokens stream past.
DECODE_BLOCKS = 4
PREFILL_BLOCKS = 2
UNROLLED_STEPS = 8  # reduction steps unrolled for unpacked weights (int8, float16)
# Row blocks per task of the grouped GEMM over interleaved experts.
GROUPED_BLOCKS = 2


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
    # (one chunk only — a rank's slice of a tiny model — needs no split: rfactor would
    # leave a unit loop that the schedule drops)
    if k_extent is not None and k_extent % lanes == 0 and k_extent > lanes:
        _, inner = schedule.split(reduction, factors=[None, lanes])
        partial = schedule.rfactor(inner, factor_axis=0)
        # rfactor leaves the final sum in a loop nest of its own: nest the partial sums
        # under its output loop so the [lanes] accumulator is per output element.
        outer = schedule.get_loops(block)[0]
        schedule.compute_at(partial, outer)
        _, lane, chunk = schedule.get_loops(partial)
        schedule.reorder(chunk, lane)
        schedule.vectorize(lane)
    _attach_epilogue(schedule, following, outer)
    schedule.parallel(outer)
    if partial is not None:  # after `parallel`, which needs the reduction block whole
        schedule.decompose_reduction(partial, chunk)


def _grouped_loops(schedule: s_tir.Schedule, name: str):
    """The grouped GEMM's block and its loops (block, row, out, k), or None."""
    block = schedule.get_sblock(name)
    loops = schedule.get_loops(block)
    return (block, *loops) if len(loops) == 4 else None


def _schedule_grouped(schedule: s_tir.Schedule, name: str, following: list[str],
                      lanes: int) -> bool:
    """Loops (block, row, out, k) → parallel (block, out); per SIMD chunk of k the weight
    vector is decoded once and every row of the block accumulates with it ([rows, lanes]
    partial sums in registers), summed across lanes at the end."""
    found = _grouped_loops(schedule, name)
    if found is None:
        return False
    block, group, row, column, reduction = found
    k_extent = _const_extent(schedule, reduction)
    if k_extent is None or k_extent % lanes or k_extent <= lanes:
        return False
    schedule.reorder(group, column, row, reduction)
    _, inner = schedule.split(reduction, factors=[None, lanes])
    # lanes last in the partial sums ([block, row, out, lane]): each row's accumulator is one
    # contiguous vector (7 % faster than lanes first on the benchmark's MoE)
    partial = schedule.rfactor(inner, factor_axis=3)
    group, column, *_ = schedule.get_loops(block)
    outer = schedule.fuse(group, column)
    schedule.compute_at(partial, outer)
    lane, rows, chunk = schedule.get_loops(partial)[1:]
    schedule.reorder(chunk, rows, lane)
    schedule.vectorize(lane)
    schedule.unroll(rows)
    _attach_epilogue(schedule, following, outer)
    schedule.parallel(outer)
    schedule.decompose_reduction(partial, chunk)
    return True


def _schedule_grouped_rows(schedule: s_tir.Schedule, name: str, following: list[str],
                           row_block: int | None) -> bool:
    """The grouped GEMM over row-interleaved experts: loops (block, row, out, k) →
    parallel (block, output tile); per stored word the tile's weights are decoded once
    (one SIMD lane per weight row) and every row of the block takes its FMAs from them, the
    activation a broadcast scalar — the dense prefill schedule, per block of one expert."""
    found = _grouped_loops(schedule, name)
    if found is None:
        return False
    block, group, row, column, reduction = found
    k_extent = _const_extent(schedule, reduction)
    n_extent = _const_extent(schedule, column)
    if k_extent is None or n_extent is None or n_extent % (row_block or 1):
        return False
    per_word = _interleaved_weight(schedule, block, row_block, k_extent)
    if per_word is None:
        return False
    blocks = next(b for b in (GROUPED_BLOCKS, 1) if n_extent % (b * row_block) == 0)
    accumulator = schedule.cache_write(block, 0, "global")
    loops = _row_lane_loops(schedule, column, reduction, blocks, row_block, per_word, k_extent)
    tile, row_blocks, lane, word, code = loops
    inner = [code] if code is not None else []
    schedule.reorder(group, tile, word, row, *inner, row_blocks, lane)
    _finish_row_lanes(schedule, block, accumulator, following, schedule.fuse(group, tile),
                      loops)
    return True


def _row_lane_loops(schedule: s_tir.Schedule, column, reduction, blocks: int, row_block: int,
                    per_word: int, k_extent: int):
    """(tile, row_blocks, lane, word, code): the output loop split into tasks of `blocks`
    row blocks of `row_block` lanes, the reduction into stored words and the codes of a word
    (code None when a step is one value)."""
    tile, row_blocks, lane = schedule.split(column, factors=[None, blocks, row_block])
    # Unroll the codes of a word (or UNROLLED_STEPS unpacked values) so the scale load, the
    # same for all of them, is shared.
    step = per_word if per_word > 1 else \
        next((u for u in (UNROLLED_STEPS, 2) if k_extent % u == 0), 1)
    word, code = schedule.split(reduction, factors=[None, step]) if step > 1 \
        else (reduction, None)
    return tile, row_blocks, lane, word, code


def _finish_row_lanes(schedule: s_tir.Schedule, block, accumulator, following: list[str],
                      home, loops) -> None:
    """Lanes vectorized, row blocks and codes unrolled, the accumulator's write-back and the
    epilogue under the task loop `home`, which runs in parallel."""
    _, row_blocks, lane, word, code = loops
    schedule.vectorize(lane)
    schedule.unroll(row_blocks)
    if code is not None:
        schedule.unroll(code)
    schedule.reverse_compute_at(accumulator, home)
    _attach_epilogue(schedule, following, home)
    schedule.parallel(home)
    schedule.decompose_reduction(block, word)


def _const_int(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _interleaved_weight(schedule: s_tir.Schedule, block, row_block: int | None,
                        k_extent: int) -> int | None:
    """Codes per stored word when the block reads a row-interleaved weight
    [rows/B, K/P, B] (fmc.quant.layout; its scales are [rows/B, K/group, B], fewer
    columns) or a stack of them [E, rows/B, K/P, B] (experts), else None."""
    if not row_block:
        return None
    columns = [_const_int(region.source.shape[-2]) for region in schedule.get(block).reads
               if len(region.source.shape) in (3, 4)
               and _const_int(region.source.shape[-1]) == row_block]
    widest = max((c for c in columns if c), default=None)
    if widest is None or k_extent % widest:
        return None
    return k_extent // widest


def _schedule_rows(schedule: s_tir.Schedule, name: str, following: list[str],
                   row_block: int | None) -> bool:
    """Matmuls over row-interleaved weights: each SIMD lane owns a weight row. The output
    rows split into tasks of `blocks` row blocks (parallel); the reduction runs word by
    word with every code of a word unrolled; the activation value is a broadcast scalar.
    With several activation rows (prefill), all tokens take their FMAs from one word's
    decoded weights before the next word is decoded."""
    block = schedule.get_sblock(name)
    *spatial, reduction = schedule.get_loops(block)
    k_extent = _const_extent(schedule, reduction)
    if len(spatial) < 2 or k_extent is None:
        return False
    per_word = _interleaved_weight(schedule, block, row_block, k_extent)
    n_extent = _const_extent(schedule, spatial[-1])
    if per_word is None or n_extent is None or n_extent % row_block:
        return False
    tokens = [_const_extent(schedule, loop) for loop in spatial[:-1]]
    decode = all(t == 1 for t in tokens)
    blocks = DECODE_BLOCKS if decode else PREFILL_BLOCKS
    blocks = next(b for b in (blocks, 2, 1) if n_extent % (b * row_block) == 0)
    # "global": small constant-size scratch goes on the stack (registers); TVM serves any
    # "local" allocation on the CPU with a workspace call per task.
    accumulator = schedule.cache_write(block, 0, "global")
    loops = _row_lane_loops(schedule, spatial[-1], reduction, blocks, row_block, per_word,
                            k_extent)
    tile, row_blocks, lane, word, code = loops
    inner = [code] if code is not None else []
    if decode:
        schedule.reorder(tile, word, *inner, row_blocks, lane)
    else:
        # Tokens inside the word loop: the decoded weights of one word (codes × row blocks
        # vectors) are loop-invariant across tokens, so LLVM keeps them in registers while
        # each token's accumulators take their FMAs. No split of the token loop: its extent
        # is symbolic, and a split's predicate would guard every FMA (measured 4.7× slower).
        token_loop = schedule.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        schedule.reorder(tile, word, token_loop, *inner, row_blocks, lane)
    _finish_row_lanes(schedule, block, accumulator, following, tile, loops)
    return True


def _attach_epilogue(schedule: s_tir.Schedule, following: list[str], loop) -> None:
    """Move the elementwise blocks after a matmul (bias, residual add, casts) under its
    output loop; stop at the next matmul or reduction (a norm's)."""
    for epilogue in following:
        consumer = schedule.get_sblock(epilogue)
        if "matmul" in epilogue or _is_reduction(schedule, consumer):
            break
        try:
            schedule.reverse_compute_at(consumer, loop)
        except s_tir.ScheduleError:
            break  # not over the matmul's output space: it stays a loop nest of its own


def schedule_matmul(func: tirx.PrimFunc, lanes: int = LANES,
                    row_block: int | None = None) -> tirx.PrimFunc | None:
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
        following = names[names.index(name) + 1:]
        if name.startswith(GROUPED_STAGE) and (
                _schedule_grouped_rows(schedule, name, following, row_block)
                or _schedule_grouped(schedule, name, following, lanes)):
            continue
        if not _schedule_rows(schedule, name, following, row_block):
            _schedule_one_matmul(schedule, name, following, lanes)
    return schedule.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPUMatmul")
class ScheduleCPUMatmul:
    """Apply `schedule_matmul` to every kernel with a matmul block; leave the rest."""

    def __init__(self, lanes: int = LANES, row_block: int | None = None):
        self.lanes = lanes  # float32 lanes of the target's widest vector
        self.row_block = row_block  # the target's weight row interleaving

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            scheduled = schedule_matmul(func, self.lanes, self.row_block)
            if scheduled is not None:
                mod[gv] = scheduled.with_attr("global_symbol", gv.name_hint) \
                    if "global_symbol" in (func.attrs or {}) else scheduled
        return mod
