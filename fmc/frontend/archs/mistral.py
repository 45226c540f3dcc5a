"""mistral: the llama-style decoder whose config names a sliding window.

Every layer attends within `sliding_window` tokens; fmc attends to the whole sequence and
caps the context at the window instead (`ModelConfig.context_window`), so what it computes
is exact. No biases. llama.cpp writes Mistral GGUF files as arch "llama" (that family reads
them). Reference: transformers `models/mistral/modeling_mistral.py`."""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config
from fmc.frontend.archs.llama import llama_style_model
from fmc.frontend.archs.registry import Architecture, register


def config_from_hf(reader: ConfigReader):
    return llama_config(reader, "mistral", sliding_window=reader.optional_int("sliding_window"))


ARCH = register(Architecture(
    name="mistral",
    doc="Mistral 7B: llama-style with a sliding attention window",
    model=llama_style_model,
    config_from_hf=config_from_hf,
    hf_model_types=("mistral",),
    presets={
        # mistralai/Mistral-7B-v0.1 (sliding window 4096 caps fmc's context at 4096)
        "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                           intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                           rope_theta=10000.0, max_position_embeddings=32768,
                           sliding_window=4096, tie_word_embeddings=False, bos_token_id=1,
                           eos_token_id=2),
    },
    features=("sliding window: the context is capped at it",),
))
