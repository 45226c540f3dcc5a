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
    # qwen3: per-head q/k RMSNorm; q/k/v/o biases; head_dim 32 with 4 heads, so q is 128
    # wide over a hidden size of 64; untied.
    "qwen3-bias": ("Qwen3Config", dict(head_dim=32, attention_bias=True,
                                       rope_theta=1000000.0)),
    # qwen3 without biases, tied embeddings, head_dim = hidden / heads.
    "qwen3-tied": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    # GQA that splits over 4 ranks (2 query heads per KV head on each).
    "llama-gqa-wide": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=4,
                                           intermediate_size=128)),
    # Every reduction dimension a multiple of 64, so all quantization schemes apply.
    "llama-quant": ("LlamaConfig", dict(intermediate_size=128, tie_word_embeddings=True)),
    # Every reduction dimension a multiple of 256: the K-quants' super-block.
    "llama-kquant": ("LlamaConfig", dict(hidden_size=256, intermediate_size=512)),
    "llama-deep": ("LlamaConfig", dict(num_hidden_layers=8)),
    # Three query heads per KV head, head_dim 32, llama3 RoPE: under --tensor-parallel 2, the
    # shape whose CUDA tree-attention kernel TIR's CSE broke (fmc/targets/tir_pipeline.py).
    # Mixture of experts: 4 experts, top-2 (mixtral renormalises the two weights).
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    # qwen3's attention (head_dim 32: q wider than the hidden size) with 4 experts of width
    # 64, top-2, norm_topk_prob on (as Qwen3-30B-A3B).
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, head_dim=32,
                                         norm_topk_prob=True, rope_theta=1000000.0)),
    "llama-three-per-kv": ("LlamaConfig", dict(
        hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        intermediate_size=256, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
}


def write_tiny_checkpoint(name: str, directory: Path, seed: int = 0, std: float = 0.08) -> Path:
    """TINY_MODELS[name] with random weights (write_random_checkpoint)."""
    import transformers

    class_name, overrides = TINY_MODELS[name]
    config = getattr(transformers, class_name)(**{**BASE, **overrides})
    return write_random_checkpoint(config, directory, seed=seed, std=std)


def write_random_checkpoint(config, directory: Path, seed: int = 0, std: float = 0.08,
                            norm: tuple[float, float] = (1.0, 0.1)) -> Path:
    """Save a transformers *ForCausalLM of `config` with random weights (larger than HF's
    init, so attention is far from uniform; norm weights `norm[0] + norm[1] * N(0, 1)`) in
    the HF directory layout, with a word-level tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    center, spread = norm
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(center + spread * torch.randn_like(param))
            else:
                param.copy_(std * torch.randn_like(param))
    model.save_pretrained(directory)
    write_word_tokenizer(directory, config.vocab_size)
    return directory


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over w0…w{n-1} so tiny artifacts can run text commands."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))


def permute_like_llama_cpp(weight, n_head: int):
    """convert_hf_to_gguf.py's Q/K permutation, written independently of fmc's inverse."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down",
                    # qwen3 (llama.cpp's LLM_TENSOR_ATTN_Q_NORM / ATTN_K_NORM)
                    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# model_type → llama.cpp's `general.architecture`; only "llama" permutes Q/K rows.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


# GGML types gguf-py dequantizes but cannot quantize: the tests write random valid blocks.
RANDOM_BLOCK_TYPES = {"Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL"}


def random_blocks(qtype, rows: int, k: int, seed: int = 0):
    """Random bytes shaped as GGUF blocks of `qtype` for a [rows, k] tensor, with every float16
    scale field set to a small finite value (the rest — codes, packed sub-scales — random)."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    small = np.frombuffer(np.float16(3e-4).tobytes(), np.uint8)
    offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82),
               "Q3_K": (108,), "IQ4_NL": (0,)}[qtype.name]
    for offset in offsets:
        data[:, offset:offset + 2] = small
    return data.reshape(rows, -1)


def gguf_writer(path: Path, arch: str, config: dict):
    """A GGUFWriter holding the model's shape from its HF `config` (what every tiny GGUF file
    of the tests starts with; finish_gguf adds the vocabulary and writes it)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    return writer


def gguf_name(name: str, layer_names: dict[str, str]) -> str:
    """llama.cpp's name for checkpoint tensor `name`; `layer_names` maps a layer's module
    path (`self_attn.q_proj`) to its GGUF name (`attn_q`)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{layer_names[module]}.{kind}"


def add_gguf_tensor(writer, name: str, array, qtype=None) -> None:
    """`array` as float32, or quantized by gguf-py to GGML type `qtype`."""
    import gguf
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype is None:
        writer.add_tensor(name, array)
    else:
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def finish_gguf(writer, path: Path, vocab_size: int, bos: int = 0, eos: int = 1) -> Path:
    """Add a byte-level vocabulary of placeholder tokens t0…t{n-1} (the last metadata) and
    write the file."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = [f"t{i}" for i in range(vocab_size)]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf_from_checkpoint(checkpoint: Path, path: Path, quant_types: dict | None = None):
    """Convert a tiny llama, qwen2 or qwen3 checkpoint to GGUF as llama.cpp does (names, Q/K
    permutation for llama only, metadata, a byte-level vocabulary); `quant_types` maps GGUF
    names to GGML types (types in RANDOM_BLOCK_TYPES get random blocks instead of the
    checkpoint's values)."""
    import json

    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    arch = GGUF_ARCHITECTURES[config["model_type"]]
    writer = gguf_writer(path, arch, config)
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta")
                              or config["rope_parameters"]["rope_theta"])
    quant_types = quant_types or {}
    for name, array in state.items():
        gname = gguf_name(name, GGUF_LAYER_NAMES)
        if arch != "llama":
            pass
        elif name.endswith("q_proj.weight"):
            array = permute_like_llama_cpp(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = permute_like_llama_cpp(array, config["num_key_value_heads"])
        qtype = quant_types.get(gname)
        if qtype is not None and qtype.name in RANDOM_BLOCK_TYPES:
            data = random_blocks(qtype, *array.shape, seed=len(gname))
            writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            add_gguf_tensor(writer, gname, array, qtype)
    return finish_gguf(writer, path, config["vocab_size"])


# --quant-override list giving the "llama-kquant" tiny model one weight matrix in every
# built-in scheme (base --quant q4f16): one compile exercises every scheme's kernels.
EVERY_SCHEME = {
    "layers.0.self_attn.q_proj": "q4_1", "layers.0.self_attn.k_proj": "q5_0",
    "layers.0.self_attn.v_proj": "q5_1", "layers.0.self_attn.o_proj": "q4k",
    "layers.0.mlp.gate_proj": "q5k", "layers.0.mlp.up_proj": "q6k",
    "layers.0.mlp.down_proj": "q0bf16", "layers.1.self_attn.q_proj": "nf4",
    "layers.1.self_attn.k_proj": "q4_0", "layers.1.self_attn.v_proj": "q8f16",
    "layers.1.self_attn.o_proj": "q4f32", "layers.1.mlp.gate_proj": "q0f16",
    "layers.1.mlp.up_proj": "q4k", "layers.1.mlp.down_proj": "q5k",
    "lm_head": "q6k", "embed_tokens": "q4_1",
}
EVERY_SCHEME_OVERRIDES = [f"{layer}={scheme}" for layer, scheme in EVERY_SCHEME.items()]
