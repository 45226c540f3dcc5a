"""qwen2: the llama-style decoder with q/k/v biases (no o_proj bias).

`use_sliding_window: true` is refused (fmc has no per-layer window for it). GGUF arch
"qwen2": no Q/K permutation. Chat template default: ChatML.
Reference: transformers `models/qwen2/modeling_qwen2.py`."""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config, llama_config_from_gguf
from fmc.frontend.archs.llama import llama_style_model
from fmc.frontend.archs.registry import CHATML_TEMPLATE, Architecture, register


def config_from_hf(reader: ConfigReader):
    if reader.bool("use_sliding_window", False):
        raise reader._fail("use_sliding_window", "true is not supported for qwen2")
    return llama_config(reader, "qwen2", qkv_bias=True)


def config_from_gguf(meta):
    return llama_config_from_gguf(meta, "qwen2")


ARCH = register(Architecture(
    name="qwen2",
    doc="Qwen2 / Qwen2.5: llama-style with q/k/v biases",
    model=llama_style_model,
    config_from_hf=config_from_hf,
    hf_model_types=("qwen2",),
    gguf_architectures=("qwen2",),
    config_from_gguf=config_from_gguf,
    presets={
        # Qwen/Qwen2-0.5B
        "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                           intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                           max_position_embeddings=32768, tie_word_embeddings=True,
                           bos_token_id=151643, eos_token_id=151643),
    },
    chat_template=CHATML_TEMPLATE,
    features=("q/k/v biases",),
))
