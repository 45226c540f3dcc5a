"""qwen3_moe: qwen3's attention (per-head q/k RMSNorm before RoPE) with a sparse
mixture-of-experts MLP in every layer.

Peculiarities: `num_experts` SiLU-gated experts of width `moe_intermediate_size` per layer
(checkpoint `mlp.experts.<i>.gate_proj|up_proj|down_proj`), stacked at load into one
[experts, …] tensor per projection; a softmax router (`mlp.gate`, kept in float) picks
`num_experts_per_tok` per token; `norm_topk_prob` true renormalises the chosen experts'
weights to sum to 1, false keeps the softmax over all experts. Dense layers among the
sparse ones (`mlp_only_layers`, `decoder_sparse_step` > 1) and sliding layers are refused.
No shared expert (that is qwen2_moe). GGUF arch "qwen3moe": `ffn_gate_inp` (router),
`ffn_gate_exps`/`ffn_up_exps`/`ffn_down_exps` (already stacked [experts, …]),
`expert_count`, `expert_used_count`, `expert_feed_forward_length`; llama.cpp always
renormalises qwen3moe's top-k (`expert_weights_norm`, when written, says so). Chat template
default: ChatML.
Reference: transformers `models/qwen3_moe/modeling_qwen3_moe.py`."""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config, llama_config_from_gguf
from fmc.frontend.archs.registry import (
    CHATML_TEMPLATE,
    GGUF_LAYER_NAMES,
    Architecture,
    register,
)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def model(config, dtype, target, debug_layers=False, tensor_parallel=1):
    from fmc.frontend.moe_model import MoEForCausalLM

    return MoEForCausalLM(config, dtype, target, debug_layers=debug_layers,
                          tensor_parallel=tensor_parallel, mlp_name="mlp",
                          projections=PROJECTIONS)


def config_from_hf(reader: ConfigReader):
    if reader.bool("use_sliding_window", False):
        raise reader._fail("use_sliding_window", "true is not supported for qwen3_moe")
    layer_types = reader.data.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise reader._fail("layer_types", "other than full_attention are not supported for "
                           "qwen3_moe")
    if reader.data.get("mlp_only_layers"):
        raise reader._fail("mlp_only_layers", "(dense layers among the experts) is not "
                           "supported for qwen3_moe; every layer must be sparse")
    if reader.int("decoder_sparse_step", 1) != 1:
        raise reader._fail("decoder_sparse_step", "other than 1 (dense layers among the "
                           "experts) is not supported for qwen3_moe")
    bias = reader.bool("attention_bias", False)
    return llama_config(reader, "qwen3_moe", qkv_bias=bias, o_bias=bias, qk_norm=True,
                        intermediate_size=reader.int("moe_intermediate_size"),
                        # hub configs say num_experts; transformers 5 saves num_local_experts
                        num_experts=reader.int("num_experts" if "num_experts" in reader.data
                                               else "num_local_experts"),
                        num_experts_per_tok=reader.int("num_experts_per_tok"),
                        norm_topk_prob=reader.bool("norm_topk_prob", False))


def config_from_gguf(meta):
    return llama_config_from_gguf(
        meta, "qwen3_moe", qk_norm=True,
        intermediate_size=meta.int("expert_feed_forward_length"),
        num_experts=meta.int("expert_count"),
        num_experts_per_tok=meta.int("expert_used_count"),
        norm_topk_prob=meta.bool("expert_weights_norm", True))


GGUF_NAMES = {**{k: v for k, v in GGUF_LAYER_NAMES.items() if not k.startswith("ffn_")},
              "ffn_norm": "post_attention_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
              "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}

ARCH = register(Architecture(
    name="qwen3_moe",
    doc="Qwen3-MoE: qwen3's attention with a top-k softmax mixture of experts",
    model=model,
    config_from_hf=config_from_hf,
    hf_model_types=("qwen3_moe",),
    gguf_architectures=("qwen3moe",),
    config_from_gguf=config_from_gguf,
    gguf_layer_names=GGUF_NAMES,
    hf_stacked=("experts",),
    presets={
        # Qwen/Qwen3-30B-A3B
        "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                              intermediate_size=6144, moe_intermediate_size=768,
                              num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, num_experts=128,
                              num_experts_per_tok=8, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                              rope_theta=1000000.0, max_position_embeddings=40960,
                              tie_word_embeddings=False, attention_bias=False,
                              bos_token_id=151643, eos_token_id=151645),
    },
    chat_template=CHATML_TEMPLATE,
    features=("per-head q/k RMSNorm before RoPE",
              "mixture of experts: softmax router, top-k renormalised when norm_topk_prob",
              "experts stacked per projection [experts, out, in], quantized per expert",
              "router kept in float"),
))
