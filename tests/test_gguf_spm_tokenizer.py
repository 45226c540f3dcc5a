"""SentencePiece GGUF vocabularies (`tokenizer.ggml.model` "llama"): the tokenizer.json fmc
rebuilds (fmc/frontend/gguf_tokenizer.py) encodes and decodes as transformers does for the
same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), on a tiny vocabulary
written here: scored pieces without merges, byte fallback, control and user-defined tokens,
text in several scripts with characters only the byte pieces spell."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from fmc.frontend.gguf_tokenizer import merges_from_scores, tokenizer_from_gguf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "s", "a", "c", "f", "é", "ö",
          "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld", "▁wor", "▁world", "▁wörld",
          "▁t", "wo", "▁two", "▁s", "pa", "ce", "▁spa", "▁space", "▁caf", "▁café",
          "日", "本", "語", "日本", "▁日本", "п", "р", "и", "в", "е", "т", "пр", "при", "вет",
          "привет", "▁привет", ",", "▁,"]
TEXTS = ["Hello wörld, café 日本語 привет!",
         "hello  two   spaces 🙂 straße",
         "<|user|>hello<|end|> ß 日本",
         " leading space and trailing ",
         ""]


def vocabulary():
    tokens = ["<unk>", "<s>", "</s>", "<|user|>", "<|end|>"]
    types = [UNKNOWN, CONTROL, CONTROL, USER_DEFINED, CONTROL]
    scores = [0.0] * 5
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    scores += [0.0] * 256
    # Longer pieces score higher, ties broken by position (as a trained vocabulary's would).
    for index, piece in enumerate(PIECES):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-100.0 + 10 * len(piece) - index / 100)
    return tokens, scores, types


def write_spm_gguf(path, architecture="llama", add_space_prefix=None):
    import gguf

    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fields_of(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
def test_rebuilt_tokenizer_equals_transformers(architecture, tmp_path):
    """Encodings (with and without BOS) and decodings (with and without special tokens)
    equal transformers' for a llama vocabulary and for phi3's (whose prefix space
    transformers builds as a normalizer)."""
    from transformers import AutoTokenizer

    path = write_spm_gguf(tmp_path / "spm.gguf", architecture)
    ours = Tokenizer.from_str(tokenizer_from_gguf(fields_of(path), str(path))["tokenizer.json"]
                              .decode())
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    byte_pieces = 0
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special).ids
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == \
                    theirs.decode(ids, skip_special_tokens=skip), (text, skip)
            byte_pieces += sum(1 for i in ids if 5 <= i < 261)
    assert byte_pieces > 0  # 🙂 and ß are spelled by byte fallback


def test_merges_follow_the_scores():
    tokens = ["a", "b", "ab", "abb", "bb"]
    # "abb" (best score) splits two ways, the longer left piece first; then "ab", "bb".
    assert merges_from_scores(tokens, [0, 0, -1, -0.5, -2]) == \
        [("ab", "b"), ("a", "bb"), ("a", "b"), ("b", "b")]


def test_add_space_prefix_false_is_honoured(tmp_path):
    """llama.cpp adds no "▁" before the text when the file says so (transformers ignores
    the flag); the default adds it, and BOS by default."""
    with_prefix = write_spm_gguf(tmp_path / "a.gguf")
    without = write_spm_gguf(tmp_path / "b.gguf", add_space_prefix=False)
    files = {name: tokenizer_from_gguf(fields_of(p), str(p))
             for name, p in (("with", with_prefix), ("without", without))}
    tokens, _, _ = vocabulary()
    for name, expected in (("with", ["<s>", "▁hello"]), ("without", ["<s>", "hello"])):
        tokenizer = Tokenizer.from_str(files[name]["tokenizer.json"].decode())
        assert [tokens[i] for i in tokenizer.encode("hello").ids] == expected
        assert tokenizer.decode(tokenizer.encode("hello").ids) == "hello"
        assert json.loads(files[name]["tokenizer_config.json"])["add_bos_token"] is True
    # The one place fmc parts from transformers, which ignores the flag:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="b.gguf")
    assert theirs.convert_ids_to_tokens(theirs.encode("hello")) == ["<s>", "▁hello"]
