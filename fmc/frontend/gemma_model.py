"""Gemma 2 and Gemma 3 (text) decoder blocks: the llama-style model with Gemma's pieces.

What differs from `fmc.frontend.llama_model` (transformers `models/gemma2/modeling_gemma2.py`,
`models/gemma3/modeling_gemma3.py`):
- embeddings × √hidden, the factor in the compute dtype (as HF casts it);
- RMSNorm scales by (1 + w) (`GemmaRMSNorm`; the checkpoint stores w);
- four norms per layer: before and after attention, before and after the MLP;
- GELU-tanh gated MLP;
- attention scale query_pre_attn_scalar^-0.5; optional attention-logit soft-capping
  (cap·tanh(s / cap)) and final-logit soft-capping;
- sliding-window attention on the layers `arch_options["sliding_layers"]` names, the context
  not capped at the window;
- gemma3: per-head q/k RMSNorm (1 + w) before RoPE, and RoPE with one base for sliding
  layers and another (with linear scaling) for global ones — the model rotates q and k
  itself (the cache has one RoPE setting), at the positions the cache reports.

Soft-capping and the window are computed inside attention, by fmc's kernels
(`fmc.lowering.kernels.attention`, a CPU and a GPU form), which this model puts into the
cache with the options on every target (TVM's own kernels have neither); a sliding layer
passes a negative sm_scale to mark itself.

The family's settings live in `ModelConfig.arch_options`: query_pre_attn_scalar,
attn_logit_softcapping, final_logit_softcapping, sliding_window, sliding_layers, and for
gemma3 rope_local_theta and rope_global_factor.
"""

from __future__ import annotations

import dataclasses

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from fmc.frontend.llama_model import (
    Embedding,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    all_reduce,
)
from fmc.model_config import ModelConfig


class GemmaRMSNorm(nn.Module):
    """x / rms(x) · (1 + w): the checkpoint's w is kept as is (the +1 is added here)."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.rms_norm(x, self.weight + 1.0, axes=[-1], epsilon=self.eps)


def rotate(x: nn.Tensor, positions: nn.Tensor, theta: float, factor: float) -> nn.Tensor:
    """HF's rotate-half RoPE of x [n, heads, d] at `positions` [n]: inverse frequencies
    1 / theta^(2i/d) / factor (linear scaling), angles and rotation in float32."""

    def compute(x: te.Tensor, positions: te.Tensor):
        _, _, dim = x.shape
        half = int(dim) // 2

        def element(t, h, i):
            inverse = tirx.const(1.0, "float32") / tirx.power(
                tirx.const(theta, "float32"),
                (tirx.floormod(i, half) * 2).astype("float32") / tirx.const(2 * half, "float32"))
            angle = positions[t].astype("float32") * (inverse / tirx.const(factor, "float32"))
            # rotate_half: (-x2, x1); the partner index wraps, so no read leaves the row
            sign = tirx.if_then_else(i < half, tirx.const(-1.0, "float32"),
                                     tirx.const(1.0, "float32"))
            partner = x[t, h, tirx.floormod(i + half, 2 * half)].astype("float32") * sign
            value = x[t, h, i].astype("float32") * tirx.cos(angle) + partner * tirx.sin(angle)
            return value.astype(x.dtype)

        return te.compute(x.shape, element, name="gemma_rope")

    return op.tensor_expr_op(compute, name_hint="gemma_rope", args=[x, positions])


class GemmaAttention(LlamaAttention):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int, layer_id: int,
                 rope_in_model: bool):
        super().__init__(dataclass_without_qk_norm(config), dtype, ranks)
        options = config.arch_options
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # gemma3: per-head (1 + w) RMSNorm of q and k
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.sliding = layer_id in set(options.get("sliding_layers") or ())
        self.scale = float(options["query_pre_attn_scalar"]) ** -0.5
        self.rope_in_model = rope_in_model
        if rope_in_model:  # gemma3: local base on sliding layers, global base (scaled) else
            self.theta = float(options["rope_local_theta"]) if self.sliding \
                else config.rope_theta
            self.factor = 1.0 if self.sliding else float(options.get("rope_global_factor", 1))

    def forward(self, x: nn.Tensor, cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        batch, seq, _ = x.shape
        d = self.head_dim
        q = op.reshape(self.q_proj(x), (batch, seq, self.num_q, d))
        k = op.reshape(self.k_proj(x), (batch, seq, self.num_kv, d))
        v = op.reshape(self.v_proj(x), (batch, seq, self.num_kv, d))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_in_model:
            positions = cache.get_query_positions(batch * seq)
            q = op.reshape(rotate(op.reshape(q, (batch * seq, self.num_q, d)), positions,
                                  self.theta, self.factor), (batch, seq, self.num_q, d))
            k = op.reshape(rotate(op.reshape(k, (batch * seq, self.num_kv, d)), positions,
                                  self.theta, self.factor), (batch, seq, self.num_kv, d))
        qkv = op.concat([q, k, v], dim=2)
        # A negative scale marks a sliding layer for fmc's kernels (kernels/attention.py).
        out = cache.attention_with_fused_qkv(layer_id, qkv, self.num_q,
                                             sm_scale=-self.scale if self.sliding else self.scale)
        out = self.o_proj(op.reshape(out, (batch, seq, self.num_q * d)))
        return all_reduce(out, self.ranks)


def dataclass_without_qk_norm(config: ModelConfig) -> ModelConfig:
    """The llama block would build plain-weight q/k norms; Gemma builds its own."""
    return dataclasses.replace(config, qk_norm=False)


class GemmaMLP(LlamaMLP):
    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate = op.gelu(self.gate_proj(x), approximate="tanh")
        return all_reduce(self.down_proj(gate * self.up_proj(x)), self.ranks)


class GemmaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int, layer_id: int,
                 rope_in_model: bool):
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.self_attn = GemmaAttention(config, dtype, ranks, layer_id, rope_in_model)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.mlp = GemmaMLP(config, dtype, ranks)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype)

    def forward(self, h: nn.Tensor, cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        h = h + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(h), cache, layer_id))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(LlamaModel):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int, rope_in_model: bool):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            [GemmaDecoderLayer(config, dtype, ranks, i, rope_in_model)
             for i in range(config.num_hidden_layers)])
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    """gemma2 (`rope_in_model` False: the cache applies RoPE, one base for all layers) and
    gemma3 (True: the model rotates q and k with each layer's base)."""

    rope_in_model = False

    def __init__(self, config: ModelConfig, dtype: str, target, debug_layers: bool = False,
                 tensor_parallel: int = 1):
        self.config = config
        self.dtype = dtype
        self.target = target
        self.debug_layers = debug_layers
        self.model = GemmaModel(config, dtype, tensor_parallel, self.rope_in_model)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                     dtype=dtype)
        options = config.arch_options
        self.final_softcap = float(options.get("final_logit_softcapping") or 0.0)
        self.attention_softcap = float(options.get("attn_logit_softcapping") or 0.0)
        self.window = int(options.get("sliding_window") or 0) \
            if options.get("sliding_layers") else 0

    @property
    def rope_mode(self):
        return RopeMode.NONE if self.rope_in_model else RopeMode.NORMAL

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        h = self.model.embed_tokens(input_ids)
        return h * float(self.config.hidden_size) ** 0.5

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        logits = super()._logits(h)
        if self.final_softcap:
            logits = op.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def create_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                        prefill_chunk_size: tirx.Var, page_size: tirx.Var) -> PagedKVCache:
        cache = super().create_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size,
                                        page_size)
        if self.attention_softcap or self.window:
            from fmc.lowering.passes.cpu_attention import put_attention_kernels

            put_attention_kernels(relax.BlockBuilder.current(), self.attention_softcap,
                                  self.window, gpu=self.target.kind.name != "llvm")
        return cache


class Gemma3ForCausalLM(GemmaForCausalLM):
    rope_in_model = True
