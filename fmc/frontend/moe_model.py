"""The llama-style decoder with a sparse mixture-of-experts MLP (mixtral, qwen3_moe).

Attention, norms, embeddings and the entry functions are `LlamaForCausalLM`'s; each layer's
MLP is a `SparseMoE`: a softmax router over `num_experts` experts picks
`num_experts_per_tok` per token (fmc.nn_moe.route), each chosen expert is a SiLU-gated MLP
whose weights are stacked per projection ([E, width, hidden] and [E, hidden, width]), and
the outputs are summed with the routing weights. The router stays a plain float matmul (it
is not an `nn.Linear`, so quantization leaves it alone, as llama.cpp does with
`ffn_gate_inp`): a 4-bit router would move tokens between experts.

Tensor parallelism splits every expert's width (gate/up by rows, down by columns, like the
dense MLP) and replicates the router: each rank routes identically, computes its slice of
the chosen experts and the ranks' partial sums are all-reduced once per layer.
Reference: transformers `models/mixtral/modeling_mixtral.py`,
`models/qwen3_moe/modeling_qwen3_moe.py`."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from fmc.frontend.llama_model import LlamaAttention, LlamaForCausalLM, LlamaModel, all_reduce
from fmc.model_config import ModelConfig
from fmc.nn_moe import (
    ExpertLinear,
    combine,
    gather_rows,
    group_by_expert,
    route,
    scatter_rows,
    silu_times,
)

# Ablation switch (benchmarks/moe_prefill.py): False sends prompts through the gathered GEMVs.
GROUPED_PROMPTS = True


class Router(nn.Module):
    """Router logits x · Wᵀ over a plain [experts, hidden] weight."""

    def __init__(self, hidden: int, num_experts: int, dtype: str):
        self.weight = nn.Parameter((num_experts, hidden), dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.matmul(x, op.permute_dims(self.weight))


class Experts(nn.Module):
    """The stacked projections of every expert, under the checkpoint's names
    (`projections`: gate, up, down — Mixtral's w1, w3, w2)."""

    def __init__(self, config: ModelConfig, dtype: str, projections: tuple[str, str, str],
                 separate_activation: bool):
        e, hidden, width = config.num_experts, config.hidden_size, config.intermediate_size
        self.projections = projections
        # SiLU·up as a kernel of its own, not fused into down's: the CPU's integer-dot expert
        # kernels take a plain input tensor
        self.separate_activation = separate_activation
        gate, up, down = projections
        setattr(self, gate, ExpertLinear(e, hidden, width, dtype))
        setattr(self, up, ExpertLinear(e, hidden, width, dtype))
        setattr(self, down, ExpertLinear(e, width, hidden, dtype))

    def forward(self, x: nn.Tensor, chosen: nn.Tensor) -> nn.Tensor:
        """x [n, hidden], chosen [n, k] → each slot's expert output [n, k, hidden]: gathered
        GEMVs, each (token, slot) row against its expert's weight."""
        gate, up, down = (getattr(self, name) for name in self.projections)
        return down(self.activation(gate(x, chosen), up(x, chosen)), chosen)

    def activation(self, gate: nn.Tensor, up: nn.Tensor) -> nn.Tensor:
        return silu_times(gate, up) if self.separate_activation else op.silu(gate) * up

    def grouped(self, x: nn.Tensor, chosen: nn.Tensor, num_experts: int) -> nn.Tensor:
        """The same through grouped GEMMs: the pairs sorted by expert once, the whole MLP
        run in that order, the outputs put back (fmc.nn_moe)."""
        gate, up, down = (getattr(self, name) for name in self.projections)
        top_k = chosen.shape[1]
        order = group_by_expert(chosen, num_experts)
        rows = gather_rows(x, order, top_k)
        hidden = self.activation(gate.grouped(rows, order.block_expert),
                                 up.grouped(rows, order.block_expert))
        return scatter_rows(down.grouped(hidden, order.block_expert), order, top_k)


class SparseMoE(nn.Module):
    """`cpu_kernels` (a CPU target): prompt tokens (a call whose sequence axis is not 1:
    prefill) take the grouped GEMMs (unless GROUPED_PROMPTS is off), and SiLU·up is a kernel
    of its own; decode steps keep the gathered GEMVs, which read only their tokens' experts
    and pad nothing. GPU targets keep the gathered kernels (dlight's generic rules)."""

    def __init__(self, config: ModelConfig, dtype: str, ranks: int,
                 projections: tuple[str, str, str], cpu_kernels: bool):
        self.ranks = ranks
        self.num_experts = config.num_experts
        self.grouped_prompts = GROUPED_PROMPTS and cpu_kernels
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.gate = Router(config.hidden_size, config.num_experts, dtype)
        self.experts = Experts(config, dtype, projections, separate_activation=cpu_kernels)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        batch, seq, hidden = x.shape
        tokens = op.reshape(x, (batch * seq, hidden))
        logits = self.gate(tokens)
        if logits.dtype != "float32":  # route in float32, as transformers does
            logits = op.astype(logits, "float32")
        chosen, weights = route(logits, self.top_k, self.normalize)
        prompt = not (isinstance(seq, int) and seq == 1)
        outputs = self.experts.grouped(tokens, chosen, self.num_experts) \
            if self.grouped_prompts and prompt else self.experts(tokens, chosen)
        out = combine(outputs, weights)
        return op.reshape(all_reduce(out, self.ranks), (batch, seq, hidden))


class MoEDecoderLayer(nn.Module):
    """Llama's decoder layer with the MLP replaced by a `SparseMoE` at attribute `mlp_name`
    (Mixtral: `block_sparse_moe`; Qwen3-MoE: `mlp`)."""

    def __init__(self, config: ModelConfig, dtype: str, ranks: int, mlp_name: str,
                 projections: tuple[str, str, str], cpu_kernels: bool):
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = nn.RMSNorm(hidden, -1, eps, bias=False, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype, ranks)
        self.post_attention_layernorm = nn.RMSNorm(hidden, -1, eps, bias=False, dtype=dtype)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, SparseMoE(config, dtype, ranks, projections, cpu_kernels))

    def forward(self, h: nn.Tensor, cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cache, layer_id)
        return h + getattr(self, self.mlp_name)(self.post_attention_layernorm(h))


class MoEModel(LlamaModel):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int, mlp_name: str,
                 projections: tuple[str, str, str], cpu_kernels: bool):
        super().__init__(config, dtype, ranks)
        self.layers = nn.ModuleList(
            [MoEDecoderLayer(config, dtype, ranks, mlp_name, projections, cpu_kernels)
             for _ in range(config.num_hidden_layers)])


class MoEForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` whose layers' MLPs are sparse mixtures of experts."""

    def __init__(self, config: ModelConfig, dtype: str, target, debug_layers: bool = False,
                 tensor_parallel: int = 1, *, mlp_name: str = "mlp",
                 projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__(config, dtype, target, debug_layers=debug_layers,
                         tensor_parallel=tensor_parallel)
        # The CPU targets' expert kernels (SparseMoE); GPU targets keep the gathered kernels.
        self.model = MoEModel(config, dtype, tensor_parallel, mlp_name, projections,
                              cpu_kernels=target.kind.name == "llvm")
