"""Model families, one module each (llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, phi3,
gemma2, gemma3); see docs/architectures.md.

`register(Architecture(...))` adds a family; `--arch-plugin FILE` imports a user's file that
does so."""

from fmc.frontend.archs.registry import (
    Architecture,
    KVCacheNeeds,
    all_architectures,
    by_gguf_architecture,
    by_model_type,
    get,
    load_plugin,
    register,
)

__all__ = ["Architecture", "KVCacheNeeds", "all_architectures", "by_gguf_architecture",
           "by_model_type", "get", "load_plugin", "register"]
