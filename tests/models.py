"""Tiny random checkpoints written by the tests themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=256, tie_word_embeddings=False)

# name → (transformers config class name, overrides of BASE)
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama-gqa-untied": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_attention_heads=2,
                                       num_key_value_heads=1, hidden_size=48, head_dim=24)),
    "llama3-rope-scaling": ("LlamaConfig", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0)),
    "qwen2-bias": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
}


def write_tiny_checkpoint(name: str, directory: Path, seed: int = 0, std: float = 0.08) -> Path:
    """Save a transformers *ForCausalLM with random weights (larger than HF's init, so
    attention is far from uniform) in the HF directory layout."""
    import torch
    import transformers

    class_name, overrides = TINY_MODELS[name]
    config = getattr(transformers, class_name)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(std * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory
