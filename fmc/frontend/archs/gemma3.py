"""gemma3: Gemma 3 (text) — gemma2's structure, without its soft-caps, with q/k norms and
two RoPE bases.

Peculiarities (the model: fmc.frontend.gemma_model): everything gemma2 has (embeddings ×
√hidden, (1 + w) RMSNorms, four norms per layer, GELU-tanh MLP, query_pre_attn_scalar), its
soft-caps off by default (honoured when a config sets them); per-head (1 + w) RMSNorm of q
and k before RoPE; sliding and global layers from `layer_types` (else five sliding layers to
one global, `sliding_window_pattern`); RoPE base `rope_local_base_freq` on sliding layers and
`rope_theta` with the config's linear scaling on global ones — the model rotates q and k
itself; the sliding window is per layer, the context not capped. HF model_type
`gemma3_text`, and the multimodal `gemma3` (Gemma3ForConditionalGeneration) for its text
model: `text_config` over Gemma3TextConfig's defaults, the language model's tensors
(`language_model.model.*`, transformers 5's `model.language_model.*`), the vision tower's
ignored. GGUF arch
"gemma3": `rope.freq_base_swa` (local base), linear `rope.scaling.*` for the global layers,
norm weights stored as 1 + w (undone on load).
Reference: transformers `models/gemma3/modeling_gemma3.py`."""

from __future__ import annotations

from typing import Any

from fmc.errors import InputError
from fmc.frontend.architectures import (
    ConfigReader,
    GGUFMetadata,
    llama_config,
    llama_config_from_gguf,
)
from fmc.frontend.archs.gemma2 import (
    FEATURES,
    FULL,
    GEMMA_GGUF_LAYER_NAMES,
    GEMMA_GGUF_OFFSETS,
    GEMMA_TEMPLATE,
    SLIDING,
    gemma_model,
    gemma_options,
    gguf_options,
    without,
)
from fmc.frontend.archs.registry import Architecture, KVCacheNeeds, register

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # HF Gemma3TextConfig's defaults


def _factor(reader: ConfigReader, key: str, params: Any, layer: str) -> float:
    """The linear RoPE scaling factor of one layer kind's parameters (1: none)."""
    if not params:
        return 1.0
    if not isinstance(params, dict):
        raise reader._fail(key, "must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "linear" or layer == SLIDING:
        raise reader._fail(key, f"type {kind!r} for {layer} layers is not supported "
                           "(supported: default; linear on full_attention layers)")
    factor = params.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise reader._fail(key, f"factor must be a positive number, got {factor!r}")
    return float(factor)


def _theta(reader: ConfigReader, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise reader._fail(key, f"must be a positive number, got {value!r}")
    return float(value)


def rope(reader: ConfigReader) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from transformers 5's per-kind
    `rope_parameters` or 4.x's rope_theta / rope_local_base_freq / rope_scaling."""
    data = reader.data
    params = data.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
        _factor(reader, "rope_parameters", local, SLIDING)
        return (_theta(reader, "rope_parameters", full.get("rope_theta", GLOBAL_THETA)),
                _theta(reader, "rope_parameters", local.get("rope_theta", LOCAL_THETA)),
                _factor(reader, "rope_parameters", full, FULL))
    flat = params if isinstance(params, dict) else {}  # 5.x with one kind: flat parameters
    scaling = data.get("rope_scaling") or flat
    return (_theta(reader, "rope_theta", data.get("rope_theta",
                                                  flat.get("rope_theta", GLOBAL_THETA))),
            _theta(reader, "rope_local_base_freq", data.get("rope_local_base_freq", LOCAL_THETA)),
            _factor(reader, "rope_scaling", scaling, FULL))


# Gemma3TextConfig's defaults: a multimodal config's `text_config` lists only what differs.
TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
                     query_pre_attn_scalar=256, sliding_window=4096, attention_bias=False,
                     tie_word_embeddings=True, rope_theta=GLOBAL_THETA,
                     rope_local_base_freq=LOCAL_THETA)


def text_config(reader: ConfigReader) -> ConfigReader:
    """A multimodal `gemma3` config's text model (token ids from the outer config)."""
    text = reader.data.get("text_config")
    if not isinstance(text, dict):
        raise reader._fail("text_config", "must be an object (the text model's config)")
    data = {**TEXT_DEFAULTS, **text}
    for key in ("bos_token_id", "eos_token_id"):
        if key in reader.data and key not in text:
            data[key] = reader.data[key]
    return ConfigReader(data, f"{reader.origin} (text_config)")


def config_from_hf(reader: ConfigReader):
    if reader.data.get("model_type") == "gemma3":
        reader = text_config(reader)
    layers = reader.int("num_hidden_layers")
    pattern = reader.int("sliding_window_pattern", 6)
    if pattern <= 0:
        raise reader._fail("sliding_window_pattern", f"must be positive, got {pattern!r}")
    options = gemma_options(reader, layers, pattern, attn_cap=None, final_cap=None)
    kinds = reader.data.get("layer_types")
    if "sliding_layers" not in options and (kinds is None or SLIDING in kinds) and \
            pattern > 1:
        # sliding layers without a window would still take the local RoPE base in HF
        raise reader._fail("sliding_window", "is missing, but the model has sliding layers")
    global_theta, local_theta, factor = rope(reader)
    options["rope_local_theta"] = local_theta
    if factor != 1.0:
        options["rope_global_factor"] = factor
    bias = reader.bool("attention_bias", False)
    base = without(reader, "hidden_act", "hidden_activation", "rope_parameters",
                   "rope_scaling", head_dim=256, tie_word_embeddings=True,
                   max_position_embeddings=131072)
    return llama_config(base, "gemma3", qkv_bias=bias, o_bias=bias, qk_norm=True,
                        rope_theta=global_theta, arch_options=options)


ROPE_SCALING_KEYS = ("rope.scaling.type", "rope.scaling.factor")


def config_from_gguf(meta: GGUFMetadata):
    """The global layers' linear scaling is `rope.scaling.factor`; llama.cpp's local base
    defaults to 10000 when `rope.freq_base_swa` is absent."""
    kind = meta.get("rope.scaling.type", "none")
    factor = meta.float("rope.scaling.factor", 1.0) or 1.0
    if kind not in ("none", "linear"):
        raise InputError(f"{meta.origin}: GGUF RoPE scaling {kind!r} is not supported for "
                         "gemma3 (linear only)")
    options = gguf_options(meta, 6, None, large_layers=62)
    options["rope_local_theta"] = meta.float("rope.freq_base_swa", LOCAL_THETA)
    if kind == "linear" and factor != 1.0:
        options["rope_global_factor"] = factor
    fields = {k: v for k, v in meta.fields.items()
              if k.removeprefix(f"{meta.arch}.") not in ROPE_SCALING_KEYS}
    plain = GGUFMetadata(fields, meta.tensor_names, meta.origin)
    return llama_config_from_gguf(plain, "gemma3", tie_word_embeddings=True, qk_norm=True,
                                  rope_theta=meta.float("rope.freq_base", GLOBAL_THETA),
                                  arch_options=options)


ARCH = register(Architecture(
    name="gemma3",
    doc="Gemma 3 (text): gemma2's blocks with q/k norms, local and global RoPE bases",
    model=gemma_model,
    config_from_hf=config_from_hf,
    hf_model_types=("gemma3_text", "gemma3"),
    # the multimodal checkpoint's language model (4.x names, then transformers 5's)
    hf_weight_names={"language_model.model.": "model.", "model.language_model.": "model.",
                     "language_model.lm_head.": "lm_head."},
    gguf_architectures=("gemma3",),
    config_from_gguf=config_from_gguf,
    gguf_layer_names={**GEMMA_GGUF_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm",
                      "attn_k_norm": "self_attn.k_norm"},
    gguf_weight_offsets=GEMMA_GGUF_OFFSETS,
    presets={
        # google/gemma-3-1b-pt (the text model)
        "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                           intermediate_size=6912, num_hidden_layers=26,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                           rope_theta=1000000.0, rope_local_base_freq=10000.0,
                           rope_scaling=None, max_position_embeddings=32768,
                           query_pre_attn_scalar=256, sliding_window=512,
                           sliding_window_pattern=6, attn_logit_softcapping=None,
                           final_logit_softcapping=None, attention_bias=False,
                           tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    },
    chat_template=GEMMA_TEMPLATE,
    kv_cache=KVCacheNeeds(rope="none", sliding_window="per-layer"),
    features=(*FEATURES, "per-head q/k RMSNorm (1 + w) before RoPE",
              "RoPE base rope_local_base_freq on sliding layers, rope_theta (linear "
              "scaling) on global ones", "GGUF norm weights stored as 1 + w"),
))
