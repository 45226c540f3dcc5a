"""gemma2: Gemma 2 — the llama-style decoder with Gemma's norms, scaling and soft-caps.

Peculiarities (the model: fmc.frontend.gemma_model): embeddings × √hidden; RMSNorm scaling by
(1 + w); four norms per layer (input, post-attention, pre- and post-feedforward); GELU-tanh
gated MLP; attention scale `query_pre_attn_scalar`^-0.5; attention-logit and final-logit
soft-capping (cap·tanh(x / cap)); sliding-window attention on alternate layers (the first of
each pair; `layer_types` when given), the context not capped at the window. Soft-capping
inside attention and the window are computed by fmc's CPU attention kernels; other targets
refuse a config that needs them. GGUF arch "gemma2": llama.cpp's `attn_post_norm`,
`ffn_post_norm`, norm weights stored as 1 + w (undone on load), no Q/K permutation, the
attention scale as llama.cpp derives it. Chat template default: Gemma's turns.
Reference: transformers `models/gemma2/modeling_gemma2.py`."""

from __future__ import annotations

from typing import Any

from fmc.errors import InputError
from fmc.frontend.architectures import (
    ConfigReader,
    GGUFMetadata,
    llama_config,
    llama_config_from_gguf,
)
from fmc.frontend.archs.registry import (
    GGUF_LAYER_NAMES,
    Architecture,
    KVCacheNeeds,
    register,
)

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
SLIDING, FULL = "sliding_attention", "full_attention"

GEMMA_GGUF_LAYER_NAMES = {
    **GGUF_LAYER_NAMES,
    "attn_post_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_post_norm": "post_feedforward_layernorm",
}
# llama.cpp's converter stores every gemma norm weight (layers, q/k norms, final) as 1 + w.
GEMMA_GGUF_OFFSETS = {"norm.weight": -1.0}

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def gemma_model(config, dtype, target, debug_layers=False, tensor_parallel=1):
    from fmc.frontend.gemma_model import Gemma3ForCausalLM, GemmaForCausalLM

    cls = Gemma3ForCausalLM if config.architecture == "gemma3" else GemmaForCausalLM
    return cls(config, dtype, target, debug_layers=debug_layers,
               tensor_parallel=tensor_parallel)


def optional_number(reader: ConfigReader, key: str, default: float | None) -> float | None:
    value = reader.data.get(key, default)
    return None if value is None else reader.float(key, default)


def sliding_layers(reader: ConfigReader, layers: int, pattern: int) -> list[int]:
    """Indices of the sliding layers: `layer_types` when given, else every layer but each
    `pattern`-th (HF's default: sliding unless (i + 1) % pattern == 0); none without a
    window."""
    if reader.data.get("sliding_window") is None:
        return []
    kinds = reader.data.get("layer_types")
    if kinds is None:
        return [i for i in range(layers) if (i + 1) % pattern]
    if not isinstance(kinds, list) or len(kinds) != layers or \
            any(kind not in (SLIDING, FULL) for kind in kinds):
        raise reader._fail("layer_types", f"must list {layers} entries, each {SLIDING!r} or "
                           f"{FULL!r}")
    return [i for i, kind in enumerate(kinds) if kind == SLIDING]


def gemma_options(reader: ConfigReader, layers: int, pattern: int, attn_cap: float | None,
                  final_cap: float | None) -> dict[str, Any]:
    """arch_options shared by gemma2 and gemma3, with HF's defaults for absent keys."""
    act = reader.data.get("hidden_activation") or reader.data.get("hidden_act") or ACTIVATIONS[0]
    if act not in ACTIVATIONS:
        raise reader._fail("hidden_activation", f"{act!r} is not supported (only "
                           "gelu_pytorch_tanh)")
    if reader.data.get("use_bidirectional_attention"):
        raise reader._fail("use_bidirectional_attention", "true is not supported")
    scalar = reader.float("query_pre_attn_scalar", 256)
    if not scalar > 0:
        raise reader._fail("query_pre_attn_scalar", f"must be positive, got {scalar!r}")
    caps = {key: optional_number(reader, key, default) for key, default in
            (("attn_logit_softcapping", attn_cap), ("final_logit_softcapping", final_cap))}
    for key, cap in caps.items():
        if cap is not None and not cap > 0:
            raise reader._fail(key, f"must be positive, got {cap!r}")
    window = reader.optional_int("sliding_window")
    if window is not None and window <= 0:
        raise reader._fail("sliding_window", f"must be positive, got {window!r}")
    sliding = sliding_layers(reader, layers, pattern)
    options: dict[str, Any] = {"query_pre_attn_scalar": scalar,
                               **{key: cap for key, cap in caps.items() if cap is not None}}
    if sliding:
        options.update(sliding_window=window, sliding_layers=sliding)
    return options


def without(reader: ConfigReader, *keys: str, **defaults: Any) -> ConfigReader:
    """The config with `keys` removed (read by the family itself) and HF's defaults for the
    llama-style keys gemma configs may leave out."""
    data = {k: v for k, v in reader.data.items() if k not in keys}
    for key, value in defaults.items():
        data.setdefault(key, value)
    return ConfigReader(data, reader.origin)


def config_from_hf(reader: ConfigReader):
    layers = reader.int("num_hidden_layers")
    options = gemma_options(reader, layers, 2, attn_cap=50.0, final_cap=30.0)
    bias = reader.bool("attention_bias", False)
    base = without(reader, "hidden_act", "hidden_activation", head_dim=256,
                   tie_word_embeddings=True, max_position_embeddings=8192)
    return llama_config(base, "gemma2", qkv_bias=bias, o_bias=bias, arch_options=options)


def gguf_sliding_layers(meta: GGUFMetadata, layers: int, pattern: int) -> list[int]:
    """llama.cpp's `attention.sliding_window_pattern`: a per-layer bool array, or n (every
    layer but each n-th slides); its default is the family's."""
    value = meta.get("attention.sliding_window_pattern", pattern)
    if isinstance(value, list):
        if len(value) != layers:
            raise InputError(f"{meta.origin}: GGUF metadata "
                             f"'{meta.arch}.attention.sliding_window_pattern' lists "
                             f"{len(value)} layers, the model has {layers}")
        return [i for i, swa in enumerate(value) if swa]
    n = meta.int("attention.sliding_window_pattern", pattern)
    return [i for i in range(layers) if n == 0 or i % n < n - 1]


def gguf_options(meta: GGUFMetadata, pattern: int, default_window: int | None,
                 large_layers: int) -> dict[str, Any]:
    """arch_options from GGUF metadata. GGUF carries no query_pre_attn_scalar: llama.cpp
    uses hidden / heads for the 27B models (`large_layers` layers) and head_dim otherwise."""
    layers = meta.int("block_count")
    heads = meta.int("attention.head_count")
    hidden = meta.int("embedding_length")
    if heads <= 0:
        raise InputError(f"{meta.origin}: GGUF metadata '{meta.arch}.attention.head_count' "
                         f"must be positive, got {heads}")
    head_dim = meta.int("attention.key_length", hidden // heads)
    scalar = hidden // heads if layers == large_layers else head_dim
    options: dict[str, Any] = {"query_pre_attn_scalar": float(scalar)}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = meta.float(key, 0.0)
        if cap:
            options[key] = cap
    window = meta.int("attention.sliding_window", default_window or 0)
    if window:
        sliding = gguf_sliding_layers(meta, layers, pattern)
        if sliding:
            options.update(sliding_window=int(window), sliding_layers=sliding)
    return options


def config_from_gguf(meta: GGUFMetadata):
    options = gguf_options(meta, 2, 4096, large_layers=46)
    return llama_config_from_gguf(meta, "gemma2", tie_word_embeddings=True,
                                  arch_options=options)


FEATURES = ("embeddings × √hidden", "RMSNorm with (1 + w)", "four norms per layer",
            "GELU-tanh gated MLP", "attention scale from query_pre_attn_scalar",
            "sliding-window attention on some layers (context not capped)")

ARCH = register(Architecture(
    name="gemma2",
    doc="Gemma 2: (1 + w) norms around attention and MLP, soft-capped logits, sliding layers",
    model=gemma_model,
    config_from_hf=config_from_hf,
    hf_model_types=("gemma2",),
    gguf_architectures=("gemma2",),
    config_from_gguf=config_from_gguf,
    gguf_layer_names=GEMMA_GGUF_LAYER_NAMES,
    gguf_weight_offsets=GEMMA_GGUF_OFFSETS,
    presets={
        # google/gemma-2-2b
        "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304,
                           intermediate_size=9216, num_hidden_layers=26,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                           hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                           rope_theta=10000.0, max_position_embeddings=8192,
                           query_pre_attn_scalar=256, sliding_window=4096,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           attention_bias=False, tie_word_embeddings=True,
                           bos_token_id=2, eos_token_id=1),
    },
    chat_template=GEMMA_TEMPLATE,
    kv_cache=KVCacheNeeds(sliding_window="per-layer"),
    features=(*FEATURES, "attention-logit and final-logit soft-capping",
              "GGUF norm weights stored as 1 + w"),
))
