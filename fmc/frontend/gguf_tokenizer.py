"""Rebuild a Hugging Face `tokenizer.json` from a GGUF file's byte-level BPE vocabulary."""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from fmc.errors import InputError

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → the split regex HF uses for them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split_regex: str | None = None, split_digits: bool = False):
    steps = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_regex is None))
    return pre_tokenizers.Sequence(steps)


PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "gpt2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(split_digits=True),
    "starcoder": lambda: _byte_level(split_digits=True),
    "llama-bpe": lambda: _byte_level(LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(QWEN2_SPLIT),
}

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def tokenizer_from_gguf(fields: dict, origin: str) -> dict[str, bytes]:
    """Return {"tokenizer.json": ..., "tokenizer_config.json": ...} built from GGUF metadata."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise InputError(
            f"{origin}: GGUF tokenizer model {model!r} cannot be rebuilt (only byte-level BPE "
            "'gpt2'); pass --tokenizer DIR with the model's Hugging Face tokenizer files"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(
            f"{origin}: GGUF pre-tokenizer {pre!r} is not known to fmc (known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}); pass --tokenizer DIR with HF tokenizer files"
        )
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    token_types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    tokenizer.add_special_tokens(special)
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token", False) and isinstance(bos_id, int):
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)])

    def token_text(key: str) -> str | None:
        index = fields.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_text("tokenizer.ggml.bos_token_id"),
        "eos_token": token_text("tokenizer.ggml.eos_token_id"),
        "unk_token": token_text("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_text("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": fields.get("context_length"),
    }
    if "tokenizer.chat_template" in fields:
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
    }
