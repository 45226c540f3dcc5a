"""qwen3: the llama-style decoder with per-head RMSNorm of q and k before RoPE.

Peculiarities: `q_norm`/`k_norm` (weights [head_dim], shared by all heads) applied to each
head's q and k after the projections and before the cache rotates them; q/k/v/o biases when
`attention_bias` is true; `head_dim` from the config (q's width may differ from the hidden
size); tied or untied embeddings. `use_sliding_window: true` (or a sliding layer in
`layer_types`) is refused. GGUF arch "qwen3": `attn_q_norm`/`attn_k_norm`, no Q/K
permutation. Chat template default: ChatML.
Reference: transformers `models/qwen3/modeling_qwen3.py`."""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config, llama_config_from_gguf
from fmc.frontend.archs.llama import llama_style_model
from fmc.frontend.archs.registry import (
    CHATML_TEMPLATE,
    GGUF_LAYER_NAMES,
    Architecture,
    register,
)


def config_from_hf(reader: ConfigReader):
    if reader.bool("use_sliding_window", False):
        raise reader._fail("use_sliding_window", "true is not supported for qwen3")
    layer_types = reader.data.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise reader._fail("layer_types", "other than full_attention are not supported for "
                           "qwen3")
    bias = reader.bool("attention_bias", False)
    return llama_config(reader, "qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True)


def config_from_gguf(meta):
    return llama_config_from_gguf(meta, "qwen3", qk_norm=True)


ARCH = register(Architecture(
    name="qwen3",
    doc="Qwen3 (dense): llama-style with per-head q/k RMSNorm",
    model=llama_style_model,
    config_from_hf=config_from_hf,
    hf_model_types=("qwen3",),
    gguf_architectures=("qwen3",),
    config_from_gguf=config_from_gguf,
    gguf_layer_names={**GGUF_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm",
                      "attn_k_norm": "self_attn.k_norm"},
    presets={
        # Qwen/Qwen3-0.6B
        "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                           intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                           rope_theta=1000000.0, max_position_embeddings=40960,
                           tie_word_embeddings=True, attention_bias=False,
                           bos_token_id=151643, eos_token_id=151645),
        # Qwen/Qwen3-8B
        "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                         intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, max_position_embeddings=40960,
                         tie_word_embeddings=False, attention_bias=False,
                         bos_token_id=151643, eos_token_id=151645),
    },
    chat_template=CHATML_TEMPLATE,
    features=("per-head q/k RMSNorm before RoPE", "optional q/k/v/o biases (attention_bias)",
              "head_dim from the config", "tied or untied embeddings"),
))
