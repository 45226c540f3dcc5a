"""Mixture-of-experts operators as `tvm.relax.frontend.nn` code, shared by model definitions
(fmc/frontend/moe_model.py) and quantized layers (fmc/quant/modules.py).

TVM 0.27's nn frontend has no MoE operators (MLC-LLM's `moe_matmul`/`moe_misc` live outside
TVM), so fmc writes them as TE computes that every target lowers like any other kernel:

- `route`: router logits → each token's top-k experts and their weights. Expert e's rank
  is the number of experts whose logit beats its own (ties go to the lower index), so the
  top-k are the ranks 0..k−1 — O(E²) comparisons per token, no sort, no data-dependent loop.
  The weights are the softmax over the chosen k (Mixtral; Qwen3-MoE's `norm_topk_prob`) or
  over all experts (taken at the chosen k, not renormalised).
- `ExpertLinear`: `num_experts` stacked [out, in] weights, one [E, out, in] parameter. Its
  forward is a gathered matmul: every (token, slot) row is multiplied by the weight of the
  expert routed to it, so a decode step reads only its tokens' k experts (gathered GEMVs).
- Prompt tokens (CPU targets) take the grouped route instead: `group_by_expert` sorts the
  (token, slot) pairs by expert into blocks of GROUP_ROWS rows of one expert each (an
  expert's last block padded with empty rows), `gather_rows` copies the activations into
  that order, `ExpertLinear.grouped` multiplies each block by its expert's weight — a
  grouped GEMM: a weight is read and dequantized once per block, not once per row — and
  `scatter_rows` puts the outputs back in (token, slot) order. The sort is counting, in TE:
  no sort kernel, no data-dependent loop bounds (the block count has a static bound).
- `combine`: the k expert outputs of each token summed with the routing weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

# The module name under which a family's stacked experts live (`….experts.<proj>.weight`).
EXPERTS = "experts"
# Name of the gathered matmul's TE stage: it contains "matmul", so the CPU target's matmul
# schedule (parallel outputs, SIMD reduction) takes it like any matmul.
MATMUL_STAGE = "expert_matmul"
# The grouped GEMM's stage; the CPU matmul schedule gives it its own schedule (the rows of a
# block share each decoded weight vector).
GROUPED_STAGE = "grouped_matmul"
# Rows per grouped block, all routed to one expert: each weight value is decoded once for
# them. More rows, more reuse, more padding (up to GROUP_ROWS − 1 empty rows per expert).
GROUP_ROWS = 8
# `block_expert` of the blocks past the last expert's (their rows all empty): no expert.
EMPTY_BLOCK = -1


def is_expert_param(name: str) -> bool:
    """Whether a parameter (or checkpoint tensor) belongs to stacked experts."""
    return f".{EXPERTS}." in f".{name}"


def route(logits: nn.Tensor, top_k: int, normalize: bool) -> tuple[nn.Tensor, nn.Tensor]:
    """Router logits [n, E] (float32) → (experts [n, k] int32, weights [n, k] float32),
    slot 0 the highest-scoring expert. `normalize`: softmax over the chosen k; otherwise the
    softmax over all E, read at the chosen k. Four one-stage kernels (rank, choice, softmax
    denominator, weights): dlight's GPU rules schedule each, not a multi-output one."""

    def rank(scores: te.Tensor):
        n, num = scores.shape
        other = te.reduce_axis((0, num), name="other")
        return te.compute(
            (n, num),
            lambda t, e: te.sum(tirx.Select(
                tirx.any(scores[t, other] > scores[t, e],
                         tirx.all(tirx.EQ(scores[t, other], scores[t, e]), other.var < e)),
                tirx.const(1, "int32"), tirx.const(0, "int32")), axis=other),
            name="expert_rank")

    def choice(ranks: te.Tensor):
        # max, not sum: with NaN logits several experts may share a rank, and the index must
        # still be a valid expert.
        n, num = ranks.shape
        candidate = te.reduce_axis((0, num), name="candidate")
        return te.compute(
            (n, top_k),
            lambda t, j: te.max(tirx.Select(tirx.EQ(ranks[t, candidate], j.astype("int32")),
                                            candidate.var.astype("int32"),
                                            tirx.const(0, "int32")), axis=candidate),
            name="expert_choice")

    def denominator(scores: te.Tensor, chosen: te.Tensor):
        n, num = scores.shape
        # the top logit (rank 0) is subtracted before exp, as softmax does
        if normalize:
            slot = te.reduce_axis((0, top_k), name="slot")
            return te.compute((n,), lambda t: te.sum(tirx.exp(
                scores[t, chosen[t, slot]] - scores[t, chosen[t, 0]]), axis=slot),
                name="expert_norm")
        every = te.reduce_axis((0, num), name="every")
        return te.compute((n,), lambda t: te.sum(tirx.exp(
            scores[t, every] - scores[t, chosen[t, 0]]), axis=every), name="expert_norm")

    def weight(scores: te.Tensor, chosen: te.Tensor, total: te.Tensor):
        return te.compute(
            (scores.shape[0], top_k),
            lambda t, j: tirx.exp(scores[t, chosen[t, j]] - scores[t, chosen[t, 0]]) / total[t],
            name="expert_weight")

    ranks = op.tensor_expr_op(rank, name_hint="moe_rank", args=[logits])
    experts = op.tensor_expr_op(choice, name_hint="moe_choice", args=[ranks])
    total = op.tensor_expr_op(denominator, name_hint="moe_norm", args=[logits, experts])
    weights = op.tensor_expr_op(weight, name_hint="moe_weight", args=[logits, experts, total])
    return experts, weights


Reader = Callable[[list[te.Tensor]], Callable[..., Any]]  # → value(expert, row, column)


def expert_matmul(x: nn.Tensor, experts: nn.Tensor, weights: list[nn.Tensor], reader: Reader,
                  out_features: int, name: str) -> nn.Tensor:
    """x [n, in] (every slot reads its token's row) or [n, k, in] (a row per slot), experts
    [n, k] → [n, k, out]: row (t, j) times expert experts[t, j]'s weight, transposed.
    `reader(tensors)` gives value(e, i, k) of expert e's weight [out, in] from the weight
    tensors' TE stand-ins (a quantized layer dequantizes there, inlined later)."""

    def compute(rows: te.Tensor, chosen: te.Tensor, *tensors: te.Tensor):
        value = reader(list(tensors))
        n, top_k = chosen.shape
        k = te.reduce_axis((0, rows.shape[-1]), name="k")
        per_slot = len(rows.shape) == 3

        def row(t, j, r):
            return rows[t, j, r] if per_slot else rows[t, r]

        return te.compute(
            (n, top_k, out_features),
            lambda t, j, i: te.sum(row(t, j, k) * value(chosen[t, j], i, k), axis=k),
            name=MATMUL_STAGE)

    return op.tensor_expr_op(compute, name_hint=name, args=[x, experts, *weights])


class GroupedRows(NamedTuple):
    """Where one layer's (token, slot) pairs go in the grouped order: blocks of GROUP_ROWS
    rows of one expert, the pairs of expert e in blocks `start[e]`… in pair order."""

    position: nn.Tensor  # [n·k] int32: the grouped row of pair t·k + j
    source: nn.Tensor  # [rows] int32: the pair in each grouped row, -1 for an empty one
    block_expert: nn.Tensor  # [rows / GROUP_ROWS] int32: each block's expert (EMPTY_BLOCK)


def grouped_rows_bound(pairs, num_experts: int):
    """A static bound on the grouped rows: every expert's pairs padded to whole blocks."""
    return ((pairs + GROUP_ROWS - 1) // GROUP_ROWS + num_experts) * GROUP_ROWS


def group_by_expert(chosen: nn.Tensor, num_experts: int) -> GroupedRows:
    """A counting sort of the pairs chosen [n, k] by expert (stable: ties keep pair order).
    O(pairs²) comparisons for the ranks — a few ms for a 512-token chunk of top-8, small
    beside the experts' GEMMs."""
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")

    def blocks_before(flat: te.Tensor):
        (pairs,) = flat.shape
        p = te.reduce_axis((0, pairs), name="p")
        count = te.compute((num_experts,), lambda e: te.sum(
            tirx.Select(flat[p] == e, one, zero), axis=p), name="expert_count")
        other = te.reduce_axis((0, num_experts), name="other")
        return te.compute((num_experts + 1,), lambda e: te.sum(tirx.Select(
            other.var < e, (count[other] + GROUP_ROWS - 1) // GROUP_ROWS, zero),
            axis=other), name="expert_block_start")

    def position(flat: te.Tensor, start: te.Tensor):
        (pairs,) = flat.shape
        q = te.reduce_axis((0, pairs), name="q")
        earlier = te.compute((pairs,), lambda p: te.sum(tirx.Select(
            tirx.all(q.var < p, flat[q] == flat[p]), one, zero), axis=q), name="expert_rank")
        return te.compute((pairs,), lambda p: start[flat[p]] * GROUP_ROWS + earlier[p],
                          name="grouped_position")

    def source(place: te.Tensor):
        (pairs,) = place.shape
        rows = grouped_rows_bound(pairs, num_experts)
        p = te.reduce_axis((0, pairs), name="p")
        found = te.compute((rows,), lambda r: te.sum(tirx.Select(
            place[p] == r, p.var.astype("int32") + 1, zero), axis=p), name="grouped_found")
        return te.compute((rows,), lambda r: found[r] - 1, name="grouped_source")

    def block_expert(start: te.Tensor, place: te.Tensor):
        blocks = grouped_rows_bound(place.shape[0], num_experts) // GROUP_ROWS
        e = te.reduce_axis((0, num_experts), name="e")
        count = te.compute((blocks,), lambda b: te.sum(tirx.Select(
            start[e] <= b, one, zero), axis=e), name="block_expert_count")
        # the last expert whose blocks start at or before b (experts with no pairs share
        # their successor's start and come before it); blocks past the last expert's hold
        # only empty rows: EMPTY_BLOCK, which a kernel may skip
        return te.compute((blocks,), lambda b: tirx.Select(
            b < start[num_experts], tirx.max(tirx.min(count[b] - 1, num_experts - 1), 0),
            tirx.const(EMPTY_BLOCK, "int32")), name="block_expert")

    n, k = chosen.shape
    flat = op.reshape(chosen, (n * k,))
    start = op.tensor_expr_op(blocks_before, name_hint="moe_block_start", args=[flat])
    place = op.tensor_expr_op(position, name_hint="moe_grouped_position", args=[flat, start])
    return GroupedRows(place,
                       op.tensor_expr_op(source, name_hint="moe_grouped_source", args=[place]),
                       op.tensor_expr_op(block_expert, name_hint="moe_block_expert",
                                         args=[start, place]))


def gather_rows(x: nn.Tensor, grouped: GroupedRows, top_k: int) -> nn.Tensor:
    """x [n, in] → [rows, in] in grouped order (pair t·k + j reads token t; empty rows 0)."""

    def compute(tokens: te.Tensor, source: te.Tensor):
        rows, width = source.shape[0], tokens.shape[1]
        return te.compute((rows, width), lambda r, c: tirx.Select(
            source[r] >= 0, tokens[tirx.max(source[r], 0) // top_k, c],
            tirx.const(0, tokens.dtype)), name="grouped_gather")

    return op.tensor_expr_op(compute, name_hint="moe_grouped_gather",
                             args=[x, grouped.source])


def scatter_rows(y: nn.Tensor, grouped: GroupedRows, top_k: int) -> nn.Tensor:
    """Grouped outputs [rows, out] → [n, k, out] in (token, slot) order."""

    def compute(rows: te.Tensor, place: te.Tensor):
        pairs, width = place.shape[0], rows.shape[1]
        return te.compute((pairs // top_k, top_k, width),
                          lambda t, j, c: rows[place[t * top_k + j], c],
                          name="grouped_scatter")

    return op.tensor_expr_op(compute, name_hint="moe_grouped_scatter",
                             args=[y, grouped.position])


def grouped_matmul(x: nn.Tensor, block_expert: nn.Tensor, weights: list[nn.Tensor],
                   reader: Reader, out_features: int, name: str) -> nn.Tensor:
    """x [rows, in] in grouped order → [rows, out]: the rows of block b times expert
    block_expert[b]'s weight, transposed (one expert per block: the grouped GEMM)."""

    def compute(rows: te.Tensor, experts: te.Tensor, *tensors: te.Tensor):
        value = reader(list(tensors))
        blocks = experts.shape[0]
        k = te.reduce_axis((0, rows.shape[1]), name="k")
        return te.compute(
            (blocks, GROUP_ROWS, out_features),
            # an empty block reads expert 0 (its rows are zeros; the scatter never reads
            # its outputs)
            lambda b, r, i: te.sum(rows[b * GROUP_ROWS + r, k] *
                                   value(tirx.max(experts[b], 0), i, k), axis=k),
            name=GROUPED_STAGE)

    out = op.tensor_expr_op(compute, name_hint=name, args=[x, block_expert, *weights])
    return op.reshape(out, (x.shape[0], out_features))


class ExpertLinear(nn.Module):
    """`num_experts` bias-free linear layers stacked: weight [E, out, in] (the quantizer
    replaces it with `fmc.quant.modules.QuantizedExpertLinear`)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, dtype: str):
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter((num_experts, out_features, in_features), dtype)

    def weight_tensors(self) -> list[nn.Tensor]:
        return [self.weight]

    def weight_reader(self, tensors: list[te.Tensor]) -> Callable[..., Any]:
        (weight,) = tensors
        return lambda e, i, k: weight[e, i, k]

    def forward(self, x: nn.Tensor, experts: nn.Tensor) -> nn.Tensor:
        return expert_matmul(x, experts, self.weight_tensors(), self.weight_reader,
                             self.out_features, "moe_experts")

    def grouped(self, x: nn.Tensor, block_expert: nn.Tensor) -> nn.Tensor:
        return grouped_matmul(x, block_expert, self.weight_tensors(), self.weight_reader,
                              self.out_features, "moe_grouped")


# relax's OpPatternKind kOpaque: fusion leaves a kernel so marked on its own.
OPAQUE = 8


def silu_times(gate: nn.Tensor, up: nn.Tensor) -> nn.Tensor:
    """SiLU(gate) · up (the same arithmetic as `op.silu(gate) * up`) as a kernel fusion
    leaves alone, so the down projection's kernel reads a plain tensor (the CPU's
    integer-dot expert kernels match only that)."""

    def compute(a: te.Tensor, b: te.Tensor):
        return te.compute(a.shape, lambda *i: a(*i) * tirx.sigmoid(a(*i)) * b(*i),
                          name="silu_times_up")

    return op.tensor_expr_op(compute, name_hint="moe_silu_times_up", args=[gate, up],
                             attrs={"op_pattern": OPAQUE})


def combine(outputs: nn.Tensor, weights: nn.Tensor) -> nn.Tensor:
    """Expert outputs [n, k, h] and routing weights [n, k] (float32) → [n, h]."""

    def compute(y: te.Tensor, w: te.Tensor):
        n, top_k, hidden = y.shape
        slot = te.reduce_axis((0, top_k), name="slot")
        return te.compute((n, hidden), lambda t, c: te.sum(
            y[t, slot, c] * w[t, slot].astype(y.dtype), axis=slot), name="expert_combine")

    return op.tensor_expr_op(compute, name_hint="moe_combine", args=[outputs, weights])
