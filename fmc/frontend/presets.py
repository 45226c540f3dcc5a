"""Built-in architectures by name, as Hugging Face config dicts (weights come separately)."""

from __future__ import annotations

_LLAMA1 = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, dict] = {
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
    # mistralai/Mistral-7B-v0.1 (sliding window 4096 caps fmc's context at 4096)
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=32768, sliding_window=4096,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=32768, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151643),
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
