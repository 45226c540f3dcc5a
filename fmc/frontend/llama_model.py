"""The shared llama-style decoder blocks as `tvm.relax.frontend.nn` modules: llama, mistral,
qwen2 and qwen3 are this model parameterized by their `ModelConfig` (biases, per-head q/k
norms, tied embeddings); a family with other blocks subclasses these (docs/architectures.md).

Plain as in the checkpoint: separate q/k/v and gate/up projections, so the parameter names
are Hugging Face's and every optimisation is a later pass. Attention and RoPE come from
TVM's paged KV cache (`nn.llm.TIRPagedKVCache`), whose rotary convention is HF's rotate_half.
Reference: transformers `models/llama/modeling_llama.py`.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from fmc.artifacts import abi
from fmc.model_config import ModelConfig
from fmc.nn_ops import take


class Embedding(nn.Embedding):
    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        return take(self.weight, ids)

    def lm_head_forward(self, x: nn.Tensor) -> nn.Tensor:
        """Tied output projection over the embedding table."""
        return op.matmul(x, op.permute_dims(self.weight))


def all_reduce(x: nn.Tensor, ranks: int) -> nn.Tensor:
    """Sum a row-parallel layer's partial outputs over the tensor-parallel ranks (Disco's
    `runtime.disco.allreduce`); nothing with one rank."""
    return op.ccl_allreduce(x, "sum") if ranks > 1 else x


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int = 1):
        self.ranks = ranks
        self.num_q = config.num_attention_heads
        self.num_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = config.hidden_size, self.num_q * self.head_dim, \
            self.num_kv * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias, dtype=dtype)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # qwen3: RMSNorm over each head's q and k, before RoPE
            eps = config.rms_norm_eps
            self.q_norm = nn.RMSNorm(self.head_dim, -1, eps, bias=False, dtype=dtype)
            self.k_norm = nn.RMSNorm(self.head_dim, -1, eps, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        batch, seq, _ = x.shape
        if self.qk_norm:
            d = self.head_dim
            q = self.q_norm(op.reshape(self.q_proj(x), (batch, seq, self.num_q, d)))
            k = self.k_norm(op.reshape(self.k_proj(x), (batch, seq, self.num_kv, d)))
            v = op.reshape(self.v_proj(x), (batch, seq, self.num_kv, d))
            qkv = op.concat([q, k, v], dim=2)
        else:
            qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            qkv = op.reshape(qkv, (batch, seq, self.num_q + 2 * self.num_kv, self.head_dim))
        out = cache.attention_with_fused_qkv(layer_id, qkv, self.num_q,
                                             sm_scale=self.head_dim**-0.5)
        out = self.o_proj(op.reshape(out, (batch, seq, self.num_q * self.head_dim)))
        return all_reduce(out, self.ranks)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int = 1):
        self.ranks = ranks
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inner, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(inner, hidden, bias=bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return all_reduce(self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x)),
                          self.ranks)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int = 1):
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = nn.RMSNorm(hidden, -1, eps, bias=False, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype, ranks)
        self.post_attention_layernorm = nn.RMSNorm(hidden, -1, eps, bias=False, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype, ranks)

    def forward(self, h: nn.Tensor, cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cache, layer_id)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: str, ranks: int = 1):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config, dtype, ranks) for _ in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False,
                               dtype=dtype)

    def forward(self, h: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, cache, layer_id)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    """Entry functions over a paged KV cache; logits are always float32.

    With `tensor_parallel` N > 1, `config` is one rank's local view
    (`fmc.frontend.tensor_parallel.local_config`): its heads, KV heads and MLP slice; the
    attention and MLP outputs are all-reduced, so every rank holds the full hidden state and
    computes the (replicated) embeddings, norms and logits itself."""

    # What this model asks of the paged KV cache (`Architecture.kv_cache`): "normal" — the
    # cache applies RoPE to q and k at append; "none" — the model has rotated them.
    rope_mode = RopeMode.NORMAL

    def __init__(self, config: ModelConfig, dtype: str, target, debug_layers: bool = False,
                 tensor_parallel: int = 1):
        self.config = config
        self.dtype = dtype
        self.target = target
        self.debug_layers = debug_layers
        self.model = LlamaModel(config, dtype, tensor_parallel)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                     dtype=dtype)

    def output_layers(self) -> set[str]:
        """Layers whose weight produces the logits (the tied embedding doubles as one)."""
        return {"model.embed_tokens"} if self.config.tie_word_embeddings else {"lm_head"}

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.lm_head_forward(h)
        else:
            logits = self.lm_head(h)
        return logits if logits.dtype == "float32" else op.astype(logits, "float32")

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        """One sequence's prompt chunk → logits of its last position [1, 1, vocab]."""
        h = self.model(input_embed, paged_kv_cache)

        def last_position(x: te.Tensor):
            batch, seq, hidden = x.shape
            return te.compute((batch, 1, hidden), lambda b, _, k: x[b, seq - 1, k],
                              name="last_position")

        h = op.tensor_expr_op(last_position, name_hint="last_position", args=[h])
        return self._logits(h), paged_kv_cache

    def decode(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embed, paged_kv_cache)), paged_kv_cache

    def batch_prefill(self, input_embeds: nn.Tensor, logit_positions: nn.Tensor,
                      paged_kv_cache: PagedKVCache):
        """Packed prompts of several sequences [1, total, H] → logits at the requested
        positions [1, num_logits, vocab] (every position, for perplexity)."""
        h = self.model(input_embeds, paged_kv_cache)
        h = take(h, logit_positions, axis=1)
        return self._logits(h), paged_kv_cache

    def layer_outputs(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        """One sequence's prompt → [layers + 2, seq, hidden]: the embeddings, each decoder
        layer's output, and the final norm's (the rows of `fmc compare`)."""
        h = input_embed
        rows = [h]
        for layer_id, layer in enumerate(self.model.layers):
            h = layer(h, paged_kv_cache, layer_id)
            rows.append(h)
        rows.append(self.model.norm(h))
        return op.concat(rows, dim=0), paged_kv_cache

    def batch_decode(self, input_embeds: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def create_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                        prefill_chunk_size: tirx.Var, page_size: tirx.Var) -> PagedKVCache:
        c = self.config
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=self.rope_mode,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling or {}),
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        hidden, dtype = self.config.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            abi.EMBED: {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            abi.PREFILL: {"input_embed": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                          "paged_kv_cache": cache, "$": packed},
            abi.DECODE: {"input_embed": nn.spec.Tensor([1, 1, hidden], dtype),
                         "paged_kv_cache": cache, "$": packed},
            abi.BATCH_PREFILL: {
                "input_embeds": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "paged_kv_cache": cache, "$": packed},
            abi.BATCH_DECODE: {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, hidden], dtype),
                "paged_kv_cache": cache, "$": packed},
            abi.CREATE_KV_CACHE: {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "$": {"param_mode": "none", "effect_mode": "none"}},
        }
        if self.debug_layers:
            spec[abi.DEBUG_ENTRY] = {"input_embed": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                                 "paged_kv_cache": cache, "$": packed}
        return nn.spec.ModuleSpec.from_raw(spec, self)
