"""Structural fuzzing (issue #20): well-formed documents that carry fmc's own keys with values
of every wrong type and nesting — a table where a list belongs and the reverse. Each reader
either accepts the document or refuses it with its documented error naming the file; no
other exception (an internal error) may escape. fmc.toml and manifest.json are covered in
tests/test_fuzz.py; here: config.json, GGUF metadata values, tokenizer_config.json and a
session file's metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmc.errors import ArtifactError, InputError, UsageError
from fmc.frontend.architectures import GGUFMetadata, config_from_hf
from fmc.frontend.archs import all_architectures
from fmc.frontend.presets import PRESETS

# Values of every JSON/TOML shape: scalars of each type, lists, tables, nested both ways.
WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=3)),
                    max_size=3),
    st.just([{"rope_type": "llama3"}]), st.just({"factor": [1, 2]}), st.just([[]]),
    st.just({}), st.just(-1), st.just(0))
# too_slow: a loaded CI machine makes example generation slow, which is not a finding
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])

# config.json keys fmc reads, beyond those of the presets (which cover every family's own).
EXTRA_HF_KEYS = ("rope_scaling", "eos_token_id", "bos_token_id", "head_dim", "sliding_window",
                 "use_sliding_window", "layer_types", "attention_bias", "mlp_bias",
                 "partial_rotary_factor", "query_pre_attn_scalar", "num_local_experts",
                 "norm_topk_prob", "text_config", "torch_dtype")
PRESET_NAMES = sorted(PRESETS)


@SETTINGS
@given(preset=st.sampled_from(PRESET_NAMES), data=st.data(), value=WRONG)
def test_config_json_with_a_wrongly_typed_value(preset, data, value):
    config = dict(PRESETS[preset])
    key = data.draw(st.sampled_from(sorted(set(config) | set(EXTRA_HF_KEYS))))
    config[key] = value
    try:
        config_from_hf(config, "ckpt/config.json")
    except InputError as exc:
        assert str(exc).startswith("ckpt/config.json:"), exc


@SETTINGS
@given(document=WRONG)
def test_config_json_that_is_not_an_object(document):
    with pytest.raises(InputError, match="^ckpt/config.json: "):
        config_from_hf(document if not isinstance(document, dict) else [document],
                       "ckpt/config.json")


def gguf_fields(arch: str) -> dict:
    """Valid llama-style metadata of a tiny model for GGUF architecture `arch`."""
    fields = {"general.architecture": arch, "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for key, value in {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128,
                       "attention.head_count": 4, "attention.head_count_kv": 2,
                       "attention.key_length": 16, "attention.value_length": 16,
                       "attention.layer_norm_rms_epsilon": 1e-6, "context_length": 128,
                       "rope.freq_base": 10000.0, "rope.dimension_count": 16,
                       "expert_count": 4, "expert_used_count": 2,
                       "expert_feed_forward_length": 32, "attention.sliding_window": 8,
                       "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                       }.items():
        fields[f"{arch}.{key}"] = value
    return fields


GGUF_ARCHS = sorted({(name, arch.name) for arch in all_architectures().values()
                     for name in arch.gguf_architectures})
TENSORS = {"token_embd.weight", "output.weight", "blk.0.attn_q.weight"}


@SETTINGS
@given(which=st.sampled_from(GGUF_ARCHS), data=st.data(), value=WRONG)
def test_gguf_metadata_with_a_wrongly_typed_value(which, data, value):
    gguf_arch, family = which
    fields = gguf_fields(gguf_arch)
    key = data.draw(st.sampled_from(sorted(fields)))
    fields[key] = value
    meta = GGUFMetadata(fields, TENSORS, "m.gguf")
    if fields.get("general.architecture") != gguf_arch:
        return  # another architecture's keys: the reader picks the family by this name
    try:
        all_architectures()[family].config_from_gguf(meta)
    except InputError as exc:
        assert str(exc).startswith("m.gguf:"), exc


def test_gguf_metadata_type_errors_name_the_key():
    fields = gguf_fields("llama")
    fields["llama.block_count"] = "two"
    with pytest.raises(InputError, match=r"^m.gguf: GGUF metadata 'llama.block_count' must be "
                                         r"an integer, got 'two'"):
        all_architectures()["llama"].config_from_gguf(GGUFMetadata(fields, TENSORS, "m.gguf"))
    fields = gguf_fields("llama")
    fields["llama.rope.freq_base"] = [1.0]
    with pytest.raises(InputError, match="'llama.rope.freq_base' must be a number"):
        all_architectures()["llama"].config_from_gguf(GGUFMetadata(fields, TENSORS, "m.gguf"))


TOKENIZER_CONFIG_KEYS = ("chat_template", "bos_token", "eos_token", "add_bos_token",
                         "add_eos_token", "added_tokens_decoder", "model_max_length",
                         "pad_token", "clean_up_tokenization_spaces")


@SETTINGS
@given(key=st.sampled_from(TOKENIZER_CONFIG_KEYS), value=WRONG, whole=st.booleans())
def test_tokenizer_config_with_a_wrongly_typed_value(tmp_path_factory, key, value, whole):
    """The compile-time check (fmc.frontend.tokenizer_files) and the artifact's chat
    template loader (fmc.runtime.chat): InputError / ArtifactError naming the file."""
    from fmc.frontend.tokenizer_files import tokenizer_files
    from fmc.runtime.chat import ChatTemplate

    artifact = tmp_path_factory.mktemp("artifact")
    (artifact / "tokenizer").mkdir()
    path = artifact / "tokenizer" / "tokenizer_config.json"
    document = value if whole else {"chat_template": "{{ bos_token }}{% for m in messages %}"
                                    "{{ m['content'] }}{% endfor %}", key: value}
    path.write_text(json.dumps(document))
    try:
        tokenizer_files(artifact / "tokenizer")
    except InputError as exc:
        assert str(exc).startswith(str(path)), exc
    try:
        ChatTemplate(artifact).render([{"role": "user", "content": "hi"}])
    except ArtifactError as exc:
        assert str(exc).startswith(str(path)), exc
    except UsageError as exc:  # the template itself failing on these values
        assert str(exc).startswith("chat template:"), exc


SESSION_KEYS = ("format", "version", "abi_version", "artifact", "kv_cache", "tokens", "extra")


@pytest.fixture(scope="module")
def saved_session(tiny_artifact, tmp_path_factory):
    import fmc

    engine = fmc.load(tiny_artifact("llama-gqa-untied"))
    seq = engine.new_sequence()
    engine.prefill(seq, [5, 17, 33, 2])
    path = tmp_path_factory.mktemp("session") / "s.fmcsession"
    engine.save(seq, path)
    engine.remove(seq)
    return engine, path


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(SESSION_KEYS), value=WRONG, as_json=st.booleans())
def test_session_metadata_with_a_wrongly_typed_value(saved_session, tmp_path_factory, key,
                                                     value, as_json):
    """A session file whose header field holds another JSON shape (its metadata values are
    strings; JSON-encoded ones for tokens, extra and the KV-cache description)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    engine, path = saved_session
    with safe_open(str(path), "np") as handle:
        header = dict(handle.metadata())
    header[key] = json.dumps(value) if as_json else str(value)
    target = tmp_path_factory.mktemp("mutated") / "s.fmcsession"
    save_file(load_file(str(path)), str(target), metadata=header)
    try:
        seq, _ = engine.restore(target)
    except (ArtifactError, InputError) as exc:
        assert str(exc).startswith(str(target)), exc
    else:
        engine.remove(seq)


def test_session_groups_of_the_wrong_shape_are_refused(saved_session, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    engine, path = saved_session
    with safe_open(str(path), "np") as handle:
        header = dict(handle.metadata())
    header["kv_cache"] = json.dumps({"groups": {"0": []}})
    target = tmp_path / "s.fmcsession"
    save_file({k: np.asarray(v) for k, v in load_file(str(path)).items()}, str(target),
              metadata=header)
    with pytest.raises(ArtifactError, match=str(target)):
        engine.restore(target)
