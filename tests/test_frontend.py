"""Frontend: HF directories (single and sharded), hub cache, GGUF, presets, config errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from models import permute_like_llama_cpp, write_gguf_from_checkpoint

import fmc
from fmc.artifacts.safetensors_reader import SafetensorsFile
from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError
from fmc.frontend import open_model
from fmc.frontend.architectures import config_from_hf
from fmc.frontend.archs.registry import model_types
from fmc.frontend.gguf_file import unpermute_rows
from fmc.frontend.presets import PRESETS


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for heads, rows in [(4, 64), (2, 32), (9, 576), (3, 192)]:
        weight = rng.standard_normal((rows, 7)).astype(np.float32)
        permuted = permute_like_llama_cpp(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(unpermute_rows(permuted, heads), weight)


def test_gguf_of_a_tiny_model_matches_transformers(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    path = write_gguf_from_checkpoint(checkpoint, tmp_path / "tiny.gguf")
    source = open_model(str(path))
    assert source.kind == "gguf"
    assert source.config.num_key_value_heads == 2 and not source.config.tie_word_embeddings
    out = tmp_path / "artifact"
    compile_model(CompileOptions(model=str(path), output=out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = [5, 9, 100, 3, 44, 150]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    ours = fmc.load(out).logits(ids)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_gguf_quantized_tensor_dequantizes_like_gguf(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf_from_checkpoint(checkpoint, tmp_path / "q8.gguf",
                                      {"token_embd.weight": q8, "blk.0.attn_q.weight": q8})
    weights = open_model(str(path)).weights
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    embed = gguf.quants.dequantize(raw["token_embd.weight"].data, q8)
    np.testing.assert_array_equal(weights.load("model.embed_tokens.weight"), embed)
    q = gguf.quants.dequantize(raw["blk.0.attn_q.weight"].data, q8).reshape(64, 64)
    np.testing.assert_array_equal(weights.load("model.layers.0.self_attn.q_proj.weight"),
                                  unpermute_rows(q, 4))


def test_sharded_checkpoint_equals_single_file(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = tiny_checkpoint("llama-mha")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single, split = open_model(str(checkpoint)).weights, open_model(str(sharded)).weights
    assert single.index().keys() == split.index().keys()
    for name in single.index():
        np.testing.assert_array_equal(single.load(name), split.load(name))


def test_index_naming_a_missing_shard_is_an_error(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama-mha")).save_pretrained(
        sharded, max_shard_size="40KB")
    victim = sorted(sharded.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(InputError, match=victim.name):
        open_model(str(sharded))


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    from safetensors.torch import save_file

    tensor = torch.randn(4, 8).to(torch.bfloat16)
    save_file({"x": tensor}, str(tmp_path / "bf16.safetensors"))
    loaded = SafetensorsFile(tmp_path / "bf16.safetensors").load("x")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, tensor.float().numpy())


def test_hub_id_resolves_from_the_local_cache_only(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        open_model("someorg/tiny-llama", offline=True)
    # Lay out a snapshot exactly as huggingface_hub stores downloads.
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--tiny-llama"
    shutil.copytree(tiny_checkpoint("llama-mha"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    source = open_model("someorg/tiny-llama", offline=True)
    assert source.kind == "hub" and source.weights is not None and source.commit == revision
    assert source.config.num_attention_heads == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse(name):
    source = open_model(name)
    assert source.kind == "preset" and source.weights is None
    assert source.config.param_count() > 0


def test_preset_with_weights_checks_shapes(smollm2_gguf):
    from fmc.quant.convert import check_source

    source = open_model("smollm2-135m", weights=str(smollm2_gguf))
    assert source.weights is not None
    index = source.weights.index()
    expected = {n: i.shape for n, i in index.items()}
    assert check_source(source.weights, expected) == []
    with pytest.raises(InputError, match="model.norm.weight.*expected"):
        check_source(source.weights, {**expected, "model.norm.weight": (577,)})


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported; supported: "
                                 f"{', '.join(model_types())}$"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"hidden_size": 4096.5}, "'hidden_size' must be an integer"),
    ({"num_attention_heads": "8"}, "'num_attention_heads' must be an integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": 100}, "hidden_size \\(100\\) is not a multiple"),
    ({"hidden_act": "gelu"}, "'hidden_act' 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "type 'yarn' is not supported"),
])
def test_bad_configs_name_the_key(change, message, tmp_path):
    config = dict(PRESETS["llama-7b"])
    for key, value in change.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=message):
        config_from_hf(json.loads(path.read_text()), str(path))


def test_unknown_model_reference_suggests_a_preset():
    with pytest.raises(InputError, match="did you mean 'llama-7b'"):
        open_model("llama-7")
