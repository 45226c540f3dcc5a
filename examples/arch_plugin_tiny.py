"""An architecture plugin: `fmc compile CHECKPOINT --arch-plugin examples/arch_plugin_tiny.py`.

"tiny_scaled_llama" is a llama whose token embeddings are multiplied by a constant from its
config (`embedding_multiplier`, as Granite and Gemma do) before the first layer. The file
shows each thing a family declares (docs/architectures.md):

- the names it answers to: HF `model_type` "tiny_scaled_llama" (no GGUF form here);
- the config mapping: the llama-style keys through fmc's helper, plus its own key kept in
  `ModelConfig.arch_options` (written to manifest.json with the rest of the config);
- the weight names: the checkpoint's are the model's (llama's), so no mapping is needed;
- the `nn.Module`: a subclass of the shared llama-style model overriding one entry function;
- a preset, and what it needs from the KV cache (llama's: RoPE applied by the cache).
"""

from __future__ import annotations

from fmc.frontend.architectures import ConfigReader, llama_config
from fmc.frontend.archs import Architecture, KVCacheNeeds, register


def config_from_hf(reader: ConfigReader):
    multiplier = reader.float("embedding_multiplier")
    return llama_config(reader, "tiny_scaled_llama",
                        arch_options={"embedding_multiplier": multiplier})


def build_model(config, dtype, target, debug_layers=False, tensor_parallel=1):
    # TVM is imported when a model is built, not when the plugin is listed.
    from fmc.frontend.llama_model import LlamaForCausalLM

    class ScaledEmbeddingLlama(LlamaForCausalLM):
        def embed(self, input_ids):
            h = self.model.embed_tokens(input_ids)
            return h * self.config.arch_options["embedding_multiplier"]

    return ScaledEmbeddingLlama(config, dtype, target, debug_layers=debug_layers,
                                tensor_parallel=tensor_parallel)


register(Architecture(
    name="tiny_scaled_llama",
    doc="llama with embeddings × embedding_multiplier (an example plugin)",
    model=build_model,
    config_from_hf=config_from_hf,
    hf_model_types=("tiny_scaled_llama",),
    presets={"tiny-scaled-llama": dict(
        model_type="tiny_scaled_llama", vocab_size=160, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=256, embedding_multiplier=4.0)},
    kv_cache=KVCacheNeeds(rope="normal"),
    features=("embeddings × embedding_multiplier",),
))
