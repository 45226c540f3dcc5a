"""Rebuild a Hugging Face `tokenizer.json` from a GGUF file's vocabulary: byte-level BPE
(`tokenizer.ggml.model` "gpt2") or SentencePiece BPE ("llama"), built as transformers builds
it from the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so both encode
and decode alike."""

from __future__ import annotations

import json

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

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


def _byte_level_bpe(fields: dict, tokens: list[str], origin: str) -> Tokenizer:
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(
            f"{origin}: GGUF pre-tokenizer {pre!r} is not known to fmc (known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}); pass --tokenizer DIR with HF tokenizer files"
        )
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a piece into two
    pieces of the vocabulary, the best-scored piece's first (ties: the longer left, then
    the longer right piece, then the order of the vocabulary) — transformers'
    `generate_merges`, which its GGUF loader uses when a file lists no merges."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        splits = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(fields: dict, tokens: list[str], origin: str) -> Tokenizer:
    """SentencePiece BPE with byte fallback (`<0xNN>` pieces), merges from the file or its
    scores. The prefix space: a Metaspace that prepends "▁" to the text's first section
    (phi3: a normalizer prepending "▁" and turning every space into "▁", as transformers
    builds Phi-3's) — unless the file says `add_space_prefix` false, which llama.cpp honours
    and transformers ignores (fmc honours it)."""
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None and "tokenizer.ggml.merges" not in fields:
        raise InputError(f"{origin}: GGUF SentencePiece vocabulary has neither "
                         "tokenizer.ggml.scores nor tokenizer.ggml.merges")
    if scores is not None and len(scores) != len(tokens):
        raise InputError(f"{origin}: GGUF tokenizer.ggml.scores has {len(scores)} entries for "
                         f"{len(tokens)} tokens")
    if "tokenizer.ggml.merges" in fields:
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_scores(tokens, [float(s) for s in scores])
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                     byte_fallback=True))
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    if fields.get("general.architecture") == "phi3":
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tokenizer.normalizer = normalizers.Sequence(
            [*steps, normalizers.Replace(" ", "\u2581")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def tokenizer_from_gguf(fields: dict, origin: str) -> dict[str, bytes]:
    """Return {"tokenizer.json": ..., "tokenizer_config.json": ...} built from GGUF metadata."""
    model = fields.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise InputError(
            f"{origin}: GGUF tokenizer model {model!r} cannot be rebuilt (only byte-level BPE "
            "'gpt2' and SentencePiece 'llama'); pass --tokenizer DIR with the model's Hugging "
            "Face tokenizer files"
        )
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    token_types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        tokenizer = _byte_level_bpe(fields, tokens, origin)
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(token_types)
            if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        ]
        tokenizer.add_special_tokens(special)
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    else:
        tokenizer = _sentencepiece(fields, tokens, origin)
        # As transformers: control tokens and the named ones (bos, eos, unk, pad) are
        # special; user-defined ones are added whole but not special (kept when decoding).
        named = {fields.get(f"tokenizer.ggml.{key}_token_id")
                 for key in ("bos", "eos", "unknown", "padding")}
        tokenizer.add_special_tokens([
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(token_types) if kind == TOKEN_TYPE_CONTROL or i in named])
        tokenizer.add_tokens([
            AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == TOKEN_TYPE_USER_DEFINED and i not in named])
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    marks = []  # (token, id) around every sequence: BOS before, EOS after
    for key, on in (("bos", add_bos), ("eos", add_eos)):
        index = fields.get(f"tokenizer.ggml.{key}_token_id")
        marks.append((tokens[index], index) if on and isinstance(index, int)
                     and 0 <= index < len(tokens) else None)
    if any(marks):
        bos, eos = marks

        def template(sequence: str, type_id: int) -> list[str]:
            return [f"{mark[0]}:{type_id}" for mark in (bos,) if mark] + \
                [f"${sequence}:{type_id}"] + [f"{mark[0]}:{type_id}" for mark in (eos,) if mark]

        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(template("A", 0)),
            pair=" ".join(template("A", 0) + template("B", 1)),
            special_tokens=sorted({mark for mark in marks if mark}))

    def token_text(key: str) -> str | None:
        index = fields.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_text("tokenizer.ggml.bos_token_id"),
        "eos_token": token_text("tokenizer.ggml.eos_token_id"),
        "unk_token": token_text("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_text("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": fields.get("context_length"),
    }
    if "tokenizer.chat_template" in fields:
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
    }
