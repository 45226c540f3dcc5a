"""llama: Llama 1/2/3 (and SmolLM, TinyLlama): the plain llama-style decoder.

Peculiarities: optional attention/MLP biases (`attention_bias`, `mlp_bias`), llama3 RoPE
frequency scaling, tied or untied embeddings. GGUF files of arch "llama" (llama.cpp writes
Mistral's and Mixtral's as "llama" too) carry the converter's Q/K row permutation, undone
on load; one with `expert_count` is a Mixtral (the mixtral family's config and model).
Reference: transformers `models/llama/modeling_llama.py`."""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config, llama_config_from_gguf
from fmc.frontend.archs.registry import GGUF_LAYER_NAMES, Architecture, register


def llama_style_model(config, dtype, target, debug_layers=False, tensor_parallel=1):
    """The shared llama-style `nn.Module` (TVM is imported only when a model is built)."""
    from fmc.frontend.llama_model import LlamaForCausalLM

    return LlamaForCausalLM(config, dtype, target, debug_layers=debug_layers,
                            tensor_parallel=tensor_parallel)


def config_from_hf(reader: ConfigReader):
    bias = reader.bool("attention_bias", False)
    return llama_config(reader, "llama", qkv_bias=bias, o_bias=bias,
                        mlp_bias=reader.bool("mlp_bias", False))


def config_from_gguf(meta):
    if meta.int("expert_count", 0):  # llama.cpp writes Mixtral as arch "llama"
        from fmc.frontend.archs.mixtral import config_from_gguf as mixtral_config

        return mixtral_config(meta)
    return llama_config_from_gguf(meta, "llama")


_LLAMA1 = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

PRESETS = {
    # huggyllama/llama-7b
    "llama-7b": _LLAMA1,
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": {**_LLAMA1, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False,
                       bos_token_id=128000, eos_token_id=128001),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=2048, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2),
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
}

ARCH = register(Architecture(
    name="llama",
    doc="Llama 1/2/3, SmolLM, TinyLlama: RMSNorm, SiLU-gated MLP, RoPE",
    model=llama_style_model,
    config_from_hf=config_from_hf,
    hf_model_types=("llama",),
    gguf_architectures=("llama",),
    config_from_gguf=config_from_gguf,
    # Mixtral's experts (a "llama" GGUF with expert_count; the mixtral family's model)
    gguf_layer_names={**GGUF_LAYER_NAMES, "ffn_gate_inp": "block_sparse_moe.gate",
                      "ffn_gate_exps": "block_sparse_moe.experts.w1",
                      "ffn_up_exps": "block_sparse_moe.experts.w3",
                      "ffn_down_exps": "block_sparse_moe.experts.w2"},
    gguf_permuted_qk=True,
    presets=PRESETS,
    features=("optional attention and MLP biases", "llama3 RoPE scaling",
              "tied or untied embeddings", "GGUF Q/K rows permuted by llama.cpp"),
))
