"""mixtral: the Mistral decoder with a sparse mixture-of-experts MLP in every layer.

Peculiarities: `num_local_experts` SiLU-gated experts per layer (checkpoint
`block_sparse_moe.experts.<i>.w1|w3|w2`: gate, up, down), stacked at load into one
[experts, …] tensor per projection; a softmax router (`block_sparse_moe.gate`, kept in
float) picks `num_experts_per_tok` experts per token, whose softmax weights are
renormalised over the chosen ones; `sliding_window` caps the context as for mistral.
GGUF: llama.cpp writes Mixtral as arch "llama" with `expert_count`/`expert_used_count`
(the llama family hands it over): `ffn_gate_inp`, `ffn_gate_exps`/`ffn_up_exps`/
`ffn_down_exps` [experts, …], Q/K permuted as llama's.
Reference: transformers `models/mixtral/modeling_mixtral.py`."""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config, llama_config_from_gguf
from fmc.frontend.archs.registry import Architecture, register

PROJECTIONS = ("w1", "w3", "w2")  # gate, up, down


def model(config, dtype, target, debug_layers=False, tensor_parallel=1):
    from fmc.frontend.moe_model import MoEForCausalLM

    return MoEForCausalLM(config, dtype, target, debug_layers=debug_layers,
                          tensor_parallel=tensor_parallel, mlp_name="block_sparse_moe",
                          projections=PROJECTIONS)


def config_from_hf(reader: ConfigReader):
    return llama_config(reader, "mixtral", sliding_window=reader.optional_int("sliding_window"),
                        num_experts=reader.int("num_local_experts"),
                        num_experts_per_tok=reader.int("num_experts_per_tok"),
                        norm_topk_prob=True)


def config_from_gguf(meta):
    """A "llama" GGUF with experts (called by the llama family, whose names it uses)."""
    return llama_config_from_gguf(meta, "mixtral",
                                  num_experts=meta.int("expert_count"),
                                  num_experts_per_tok=meta.int("expert_used_count"),
                                  norm_topk_prob=True)


ARCH = register(Architecture(
    name="mixtral",
    doc="Mixtral: mistral-style with a top-k softmax mixture of experts in every layer",
    model=model,
    config_from_hf=config_from_hf,
    hf_model_types=("mixtral",),
    hf_stacked=("experts",),
    presets={
        # mistralai/Mixtral-8x7B-v0.1
        "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                             intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8,
                             num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                             rope_theta=1000000.0, max_position_embeddings=32768,
                             sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                             eos_token_id=2),
    },
    features=("mixture of experts: softmax router, top-k renormalised",
              "experts stacked per projection [experts, out, in], quantized per expert",
              "router kept in float", "sliding window: the context is capped at it"),
))
