"""phi3: Phi-3, Phi-3.5 and Phi-4-mini — the llama-style decoder with fused projections,
LongRoPE and partial rotary embeddings.

Peculiarities:
- the checkpoint stores `qkv_proj` (q, k, v stacked by rows) and `gate_up_proj` (gate, up);
  fmc splits them on load (`Architecture.fused_weights`) into llama's layers, which
  horizontal fusion joins again into one matmul each, so tensor parallelism, the quantizers
  and the calibration need nothing new;
- `longrope` (`su`; Phi3Config reads `yarn` as longrope too) scaling: inverse frequencies
  1 / (factor[i] · θ^(2i/d)) with the `long_factor`s or the `short_factor`s, and cos/sin
  scaled by the attention factor (√(1 + ln s / ln L₀), s = max/original positions,
  unless the config gives `attention_factor` or `factor`);
- partial rotary (`partial_rotary_factor`, Phi-4-mini's 0.75): only the first
  int(head_dim · factor) features of each head rotate (rotate-half within them);
- `sliding_window`: attention is exact without it once the context is capped at the window
  (`ModelConfig.context_window`), as for mistral.

Long or short factors. transformers picks them per forward call: the long ones when the
call's largest position + 1 exceeds `original_max_position_embeddings`, for every token of
the call; keys already cached keep the rotation they were stored with (so a sequence
switches factors mid-way when it crosses the original length during decode, and a prompt
prefilled in chunks uses the factors each chunk's own end selects). fmc does the same per
sequence and step: prefill entries decide by the end of the sequence's run of positions in
the call, decode steps by each token's position. TVM's paged KV cache cannot express this
(its longrope kernel chooses by the number of tokens in the call), so the model rotates q
and k itself (`KVCacheNeeds(rope="none")`) from a cos/sin table built once per forward step
from the cache's query positions.

GGUF arch "phi3" (llama.cpp's convert_hf_to_gguf.py): `attn_qkv` and `ffn_up` (gate and up
stacked) split like the checkpoint's; `rope.dimension_count` is the rotary width; the
factors are the tensors `rope_factors_long.weight` / `rope_factors_short.weight`, with
`rope.scaling.original_context_length` and `rope.scaling.attn_factor`; no Q/K permutation.
Reference: transformers `models/phi3/modeling_phi3.py`, `modeling_rope_utils.py`."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from fmc.errors import InputError
from fmc.frontend.architectures import ConfigReader, llama_config, llama_config_from_gguf
from fmc.frontend.archs.registry import (
    FUSED_GATE_UP,
    FUSED_QKV,
    GGUF_LAYER_NAMES,
    Architecture,
    KVCacheNeeds,
    register,
)

# Phi3Config's default when config.json has no original_max_position_embeddings.
DEFAULT_ORIGINAL_MAX_POSITIONS = 4096
GGUF_LONG_FACTORS = "rope_factors_long.weight"
GGUF_SHORT_FACTORS = "rope_factors_short.weight"


def _float32(value: float) -> float:
    """transformers applies the factors and the attention factor in float32 (as a GGUF file
    stores them): keep them at that precision so both sources give one config."""
    return float(np.float32(value))


def _longrope(original: int, attention_factor: float, long_factor, short_factor) -> dict:
    return {"rope_type": "longrope", "original_max_position_embeddings": int(original),
            "attention_factor": _float32(attention_factor),
            "long_factor": [_float32(v) for v in long_factor],
            "short_factor": [_float32(v) for v in short_factor]}


def _with_rope(config, rotary_dim: int, scaling: dict | None, fail):
    """The llama-style config plus phi3's RoPE; `fail(key, problem)` names the source's key."""
    if rotary_dim <= 0 or rotary_dim > config.head_dim or rotary_dim % 2:
        raise fail("partial_rotary_factor", f"gives {rotary_dim} rotary features of "
                   f"head_dim {config.head_dim} (must be even, 2…head_dim)")
    if scaling is not None:
        for key in ("long_factor", "short_factor"):
            if len(scaling[key]) != rotary_dim // 2:
                raise fail(key, f"has {len(scaling[key])} values; the rotary width "
                           f"{rotary_dim} needs {rotary_dim // 2}")
    options = dict(config.arch_options)
    if rotary_dim < config.head_dim:
        options["rotary_dim"] = rotary_dim
    # A window no shorter than the positions masks nothing (Phi-4-mini's 262144 of 131072).
    window = config.sliding_window
    if window is not None and window >= config.max_position_embeddings:
        window = None
    return dataclasses.replace(config, rope_scaling=scaling, arch_options=options,
                               sliding_window=window)


def config_from_hf(reader: ConfigReader):
    data = reader.data
    params, scaling = data.get("rope_parameters") or {}, data.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise reader._fail("rope_scaling", "must be an object")
    rope = {**params, **scaling}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("su", "yarn"):  # Phi3Config's names for longrope in older configs
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        raise reader._fail("rope_scaling", f"type {rope_type!r} is not supported for phi3 "
                           "(supported: default, longrope/su)")
    theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    # The shared reader knows default/llama3 RoPE only: hand it the rest of the config.
    plain = ConfigReader({**data, "rope_scaling": None, "rope_parameters": {"rope_theta": theta}},
                         reader.origin)
    config = llama_config(plain, "phi3", sliding_window=reader.optional_int("sliding_window"))
    partial = rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)):
        raise reader._fail("partial_rotary_factor", f"must be a number, got {partial!r}")
    longrope = None
    if rope_type == "longrope":
        # As transformers: the top-level key (default 4096) wins over rope_parameters' copy.
        original = reader.int("original_max_position_embeddings", DEFAULT_ORIGINAL_MAX_POSITIONS)
        factors = {}
        for key in ("long_factor", "short_factor"):
            values = rope.get(key)
            if not isinstance(values, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise reader._fail(f"rope_scaling.{key}", f"must be a list of numbers, got "
                                   f"{values!r}")
            factors[key] = values
        factor = rope.get("factor") or config.max_position_embeddings / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else \
                math.sqrt(1 + math.log(factor) / math.log(original))
        longrope = _longrope(original, attention, factors["long_factor"],
                             factors["short_factor"])
    return _with_rope(config, int(config.head_dim * partial), longrope,
                      lambda key, problem: reader._fail(key, problem))


def config_from_gguf(meta):
    sliding = meta.int("attention.sliding_window", 0) or None
    config = llama_config_from_gguf(meta, "phi3", sliding_window=sliding)
    rotary = meta.int("rope.dimension_count", config.head_dim)
    longrope = None
    if meta.has_tensor(GGUF_LONG_FACTORS) or meta.has_tensor(GGUF_SHORT_FACTORS):
        longrope = _longrope(meta.int("rope.scaling.original_context_length"),
                             meta.float("rope.scaling.attn_factor", 1.0),
                             meta.tensor(GGUF_LONG_FACTORS), meta.tensor(GGUF_SHORT_FACTORS))

    def fail(key, problem):
        name = {"partial_rotary_factor": f"{meta.arch}.rope.dimension_count",
                "long_factor": GGUF_LONG_FACTORS, "short_factor": GGUF_SHORT_FACTORS}[key]
        return InputError(f"{meta.origin}: GGUF {name!r} {problem}")

    return _with_rope(config, rotary, longrope, fail)


# -- the model ------------------------------------------------------------------------------


def _lookup(index, values: list[float]):
    """values[index] for a TIR index: a balanced tree of selects over float32 constants
    (the per-dimension inverse frequencies; no constant tensor to carry to the device)."""
    from tvm import tirx

    def pick(lo: int, hi: int):
        if hi - lo == 1:
            return tirx.const(values[lo], "float32")
        mid = (lo + hi) // 2
        return tirx.Select(index < mid, pick(lo, mid), pick(mid, hi))

    return pick(0, len(values))


def inverse_frequencies(theta: float, rotary_dim: int, factors=None) -> list[float]:
    """1 / (factor[i] · θ^(2i/d)) in float32, as transformers computes them."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / \
        np.float32(rotary_dim)
    base = np.float32(theta) ** exponents
    if factors is not None:
        base = np.asarray(factors, dtype=np.float32) * base
    return [float(v) for v in (np.float32(1.0) / base).astype(np.float32)]


class RopeSpec:
    """phi3's rotary embedding for one config: the rotary width, the inverse frequencies
    (short and long with LongRoPE) and the cos/sin scale."""

    def __init__(self, config):
        self.head_dim = config.head_dim
        self.rotary_dim = int(config.arch_options.get("rotary_dim", config.head_dim))
        scaling = config.rope_scaling
        self.longrope = bool(scaling) and scaling.get("rope_type") == "longrope"
        if self.longrope:
            self.original = int(scaling["original_max_position_embeddings"])
            self.scale = float(scaling["attention_factor"])
            self.short = inverse_frequencies(config.rope_theta, self.rotary_dim,
                                             scaling["short_factor"])
            self.long = inverse_frequencies(config.rope_theta, self.rotary_dim,
                                            scaling["long_factor"])
        else:
            self.scale = 1.0
            self.short = self.long = inverse_frequencies(config.rope_theta, self.rotary_dim)

    def table(self, positions, per_token: bool):
        """cos and sin [tokens, 2, rotary_dim/2] (float32) at the cache's query positions."""
        from tvm import te, tirx
        from tvm.relax.frontend.nn import op

        half = self.rotary_dim // 2

        def run_break(pos):
            # For each token, the index of the first later token that does not continue its
            # run of consecutive positions (the token count when none does). int32, like the
            # positions: the reduction's identity must print as a 32-bit literal (GLSL).
            n = pos.shape[0]
            j = te.reduce_axis((0, n), name="j")
            return te.compute(
                (n,), lambda i: te.min(tirx.Select(
                    tirx.all(j.var > i, tirx.NE(pos[j.var] - j.var, pos[i] - i)),
                    j.var.astype("int32"), n.astype("int32")), axis=j),
                name="phi3_rope_run_break")

        def table(pos, breaks=None):
            def value(t, c, k):
                p = pos[t]
                if not self.longrope:
                    inverse = _lookup(k, self.short)
                else:
                    # long once the step's last position of this sequence reaches the
                    # original length: p + 1 > L₀ per token, or at the end of p's run
                    last = p if breaks is None else p + (breaks[t] - 1 - t)
                    inverse = tirx.Select(last + 1 > self.original, _lookup(k, self.long),
                                          _lookup(k, self.short))
                angle = p.astype("float32") * inverse
                wave = tirx.Select(c < 1, tirx.cos(angle), tirx.sin(angle))
                return wave * tirx.const(self.scale, "float32") if self.scale != 1.0 else wave

            return te.compute((pos.shape[0], 2, half), value, name="phi3_rope_table")

        if per_token or not self.longrope:
            return op.tensor_expr_op(table, "phi3_rope_table", args=[positions])
        breaks = op.tensor_expr_op(run_break, "phi3_rope_run_break", args=[positions])
        return op.tensor_expr_op(table, "phi3_rope_table", args=[positions, breaks])

    def apply(self, qkv, table, rotated_heads: int):
        """Rotate the first `rotated_heads` heads (q and k) of qkv [batch, seq, heads, D]
        within their first rotary_dim features (rotate-half), as transformers does."""
        from tvm import te, tirx
        from tvm.relax.frontend.nn import op

        half, rotary, head_dim = self.rotary_dim // 2, self.rotary_dim, self.head_dim

        def rotate(x, cos_sin):
            seq = x.shape[1]

            def value(b, s, h, d):
                token = b * seq + s
                # Indices clamped: a select may evaluate both sides.
                k = tirx.min(tirx.Select(d < half, d, d - half), half - 1)
                partner = tirx.Select(d < half, -x[b, s, h, tirx.min(d + half, head_dim - 1)],
                                      x[b, s, h, tirx.max(d - half, 0)])
                rotated = x[b, s, h, d].astype("float32") * cos_sin[token, 0, k] + \
                    partner.astype("float32") * cos_sin[token, 1, k]
                return tirx.Select(tirx.all(h < rotated_heads, d < rotary),
                                   rotated.astype(x.dtype), x[b, s, h, d])

            return te.compute(x.shape, value, name="phi3_rope")

        return op.tensor_expr_op(rotate, "phi3_rope", args=[qkv, table])


@functools.cache
def _model_class():
    """The nn.Module classes (TVM is imported when a model is built, not when listed)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode

    from fmc.frontend.llama_model import (
        LlamaAttention,
        LlamaDecoderLayer,
        LlamaForCausalLM,
        LlamaModel,
        all_reduce,
    )

    class Phi3Attention(LlamaAttention):
        def forward(self, x, cache, layer_id, rope, table):
            batch, seq, _ = x.shape
            qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            qkv = op.reshape(qkv, (batch, seq, self.num_q + 2 * self.num_kv, self.head_dim))
            qkv = rope.apply(qkv, table, self.num_q + self.num_kv)
            out = cache.attention_with_fused_qkv(layer_id, qkv, self.num_q,
                                                 sm_scale=self.head_dim**-0.5)
            out = self.o_proj(op.reshape(out, (batch, seq, self.num_q * self.head_dim)))
            return all_reduce(out, self.ranks)

    class Phi3DecoderLayer(LlamaDecoderLayer):
        def __init__(self, config, dtype, ranks=1):
            super().__init__(config, dtype, ranks)
            self.self_attn = Phi3Attention(config, dtype, ranks)  # same place, same names

        def forward(self, h, cache, layer_id, rope, table):
            h = h + self.self_attn(self.input_layernorm(h), cache, layer_id, rope, table)
            return h + self.mlp(self.post_attention_layernorm(h))

    class Phi3Model(LlamaModel):
        def __init__(self, config, dtype, ranks=1):
            super().__init__(config, dtype, ranks)
            self.layers = nn.ModuleList(
                [Phi3DecoderLayer(config, dtype, ranks) for _ in range(config.num_hidden_layers)])
            self.rope = RopeSpec(config)

        def rope_table(self, h, cache):
            """The step's cos/sin table: decode steps (one token per sequence) decide
            long/short per token, prefill steps per run of positions."""
            batch, seq, _ = h.shape
            per_token = isinstance(seq, int) and seq == 1
            tokens = batch if per_token else seq if batch == 1 else batch * seq
            return self.rope.table(cache.get_query_positions(tokens), per_token)

        def forward(self, h, cache):
            table = self.rope_table(h, cache)
            for layer_id, layer in enumerate(self.layers):
                h = layer(h, cache, layer_id, self.rope, table)
            return self.norm(h)

    class Phi3ForCausalLM(LlamaForCausalLM):
        rope_mode = RopeMode.NONE  # the model rotates q and k (see the module docstring)

        def __init__(self, config, dtype, target, debug_layers=False, tensor_parallel=1):
            # The cache gets no RoPE settings: it never rotates.
            super().__init__(dataclasses.replace(config, rope_scaling=None), dtype, target,
                             debug_layers=debug_layers, tensor_parallel=tensor_parallel)
            self.model = Phi3Model(config, dtype, tensor_parallel)

        def layer_outputs(self, input_embed, paged_kv_cache):
            h = input_embed
            rows = [h]
            table = self.model.rope_table(h, paged_kv_cache)
            for layer_id, layer in enumerate(self.model.layers):
                h = layer(h, paged_kv_cache, layer_id, self.model.rope, table)
                rows.append(h)
            rows.append(self.model.norm(h))
            return op.concat(rows, dim=0), paged_kv_cache

    return Phi3ForCausalLM


def phi3_model(config, dtype, target, debug_layers=False, tensor_parallel=1):
    return _model_class()(config, dtype, target, debug_layers=debug_layers,
                          tensor_parallel=tensor_parallel)


PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}")

# microsoft/Phi-4-mini-instruct's LongRoPE long factors (its short factors are all 1.0).
_PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
    2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687,
    4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894,
    8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215,
    18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13,
    32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16,
    47.77]

ARCH = register(Architecture(
    name="phi3",
    doc="Phi-3/3.5, Phi-4-mini: fused qkv/gate_up, LongRoPE, partial rotary",
    model=phi3_model,
    config_from_hf=config_from_hf,
    hf_model_types=("phi3",),
    gguf_architectures=("phi3",),
    config_from_gguf=config_from_gguf,
    gguf_layer_names={**GGUF_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj",
                      "ffn_up": "mlp.gate_up_proj"},
    gguf_config_tensors=(GGUF_LONG_FACTORS, GGUF_SHORT_FACTORS),
    fused_weights=(FUSED_QKV, FUSED_GATE_UP),
    presets={
        # microsoft/Phi-3-mini-4k-instruct (its sliding window of 2047 caps fmc's context)
        "phi-3-mini-4k": dict(model_type="phi3", vocab_size=32064, hidden_size=3072,
                              intermediate_size=8192, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32,
                              rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                              max_position_embeddings=4096,
                              original_max_position_embeddings=4096, sliding_window=2047,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000),
        # microsoft/Phi-4-mini-instruct: 128k positions by LongRoPE, 96 of 128 features rotate
        "phi-4-mini": dict(model_type="phi3", vocab_size=200064, hidden_size=3072,
                           intermediate_size=8192, num_hidden_layers=32,
                           num_attention_heads=24, num_key_value_heads=8, rms_norm_eps=1e-5,
                           rope_theta=10000.0, partial_rotary_factor=0.75,
                           rope_scaling={"type": "longrope",
                                         "long_factor": _PHI4_MINI_LONG_FACTOR,
                                         "short_factor": [1.0] * 48},
                           max_position_embeddings=131072,
                           original_max_position_embeddings=4096, sliding_window=262144,
                           tie_word_embeddings=True, bos_token_id=199999,
                           eos_token_id=199999),
    },
    chat_template=PHI3_TEMPLATE,
    kv_cache=KVCacheNeeds(rope="none"),
    features=("fused qkv_proj / gate_up_proj (split on load)",
              "LongRoPE: long or short factors by the step's last position, as transformers",
              "partial rotary (partial_rotary_factor)",
              "sliding window: the context is capped at it"),
))
