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
  Prefill runs the same kernel (one GEMV per token and slot); a grouped GEMM over tokens
  sorted by expert is not written yet (docs/architectures.md).
- `combine`: the k expert outputs of each token summed with the routing weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

# The module name under which a family's stacked experts live (`….experts.<proj>.weight`).
EXPERTS = "experts"
# Name of the gathered matmul's TE stage: it contains "matmul", so the CPU target's matmul
# schedule (parallel outputs, SIMD reduction) takes it like any matmul.
MATMUL_STAGE = "expert_matmul"


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


def combine(outputs: nn.Tensor, weights: nn.Tensor) -> nn.Tensor:
    """Expert outputs [n, k, h] and routing weights [n, k] (float32) → [n, h]."""

    def compute(y: te.Tensor, w: te.Tensor):
        n, top_k, hidden = y.shape
        slot = te.reduce_axis((0, top_k), name="slot")
        return te.compute((n, hidden), lambda t, c: te.sum(
            y[t, slot, c] * w[t, slot].astype(y.dtype), axis=slot), name="expert_combine")

    return op.tensor_expr_op(compute, name_hint="moe_combine", args=[outputs, weights])
