"""Model families, one module each (fmc/frontend/archs/): the registry and `fmc archs`,
qwen3 from HF checkpoints and GGUF against transformers, and an architecture plugin
(examples/arch_plugin_tiny.py) compiled from outside the package. qwen3's prefill and
decode from HF checkpoints are in test_numerics.py (TINY_MODELS), its tensor-parallel run in
test_tensor_parallel.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from models import write_gguf_from_checkpoint
from test_numerics import PROMPT, TOLERANCE, relative_error

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError
from fmc.frontend import open_model
from fmc.frontend.archs import registry

EXAMPLE = Path(__file__).parent.parent / "examples" / "arch_plugin_tiny.py"


def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def matches_prefill_and_decode(engine, model, steps: int = 10) -> None:
    """All prefill positions, the last one, and `steps` greedy decode steps, each against a
    full transformers forward, within test_numerics' bound."""
    expected = logits_of(model, PROMPT)
    assert relative_error(engine.logits(PROMPT), expected) <= TOLERANCE
    seq = engine.new_sequence()
    logits = engine.prefill(seq, PROMPT)
    assert relative_error(logits, expected[-1]) <= TOLERANCE
    tokens = list(PROMPT)
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(seq, tokens[-1])
        assert relative_error(logits, logits_of(model, tokens)[-1]) <= TOLERANCE
    engine.remove(seq)


def changed_config_fails_the_comparison(family: str, change, checkpoint, artifact,
                                        output) -> None:
    """Negative control: `artifact` (the checkpoint compiled as it is) is within bound of
    transformers; the checkpoint compiled to `output` with `family`'s config passed through
    `change` (registered in-process for that compile only) is far from it."""
    expected = logits_of(hf_model(checkpoint), PROMPT)
    assert relative_error(fmc.load(artifact).logits(PROMPT), expected) <= TOLERANCE
    arch = registry.get(family)

    def config_from_hf(reader):
        return change(arch.config_from_hf(reader))

    registry.register(dataclasses.replace(arch, config_from_hf=config_from_hf))
    try:
        compile_model(CompileOptions(model=str(checkpoint), output=output))
    finally:
        registry.register(arch)
    wrong = fmc.load(output).logits(PROMPT)
    assert relative_error(wrong, expected) > 100 * TOLERANCE


def test_each_family_registers_its_names_and_presets():
    from fmc.frontend.presets import PRESETS

    archs = registry.all_architectures()
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(archs)
    assert registry.by_model_type("qwen3") is archs["qwen3"]
    assert registry.by_gguf_architecture("qwen3") is archs["qwen3"]
    assert registry.by_gguf_architecture("llama").gguf_permuted_qk
    assert not archs["qwen3"].gguf_permuted_qk and not archs["qwen2"].gguf_permuted_qk
    assert set(PRESETS) == set(registry.presets()) >= {"qwen3-0.6b", "qwen3-8b", "llama-7b"}
    with pytest.raises(InputError, match="preset 'llama-7b' is already architecture 'llama'"):
        registry.register(dataclasses.replace(archs["qwen3"], name="other",
                                              hf_model_types=(), gguf_architectures=(),
                                              presets={"llama-7b": {}}))
    assert "other" not in registry.ARCHITECTURES


@pytest.mark.parametrize("preset, non_embedding", [("qwen3-0.6b", 0.44e9),
                                                   ("qwen3-8b", 6.95e9)])
def test_qwen3_presets_have_the_published_sizes(preset, non_embedding):
    """Qwen's model cards: 0.44B and 6.95B non-embedding parameters."""
    config = open_model(preset).config
    assert config.architecture == "qwen3" and config.qk_norm and config.head_dim == 128
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings
                                                           else 2)
    assert abs(config.param_count() - embedding - non_embedding) < 0.01 * non_embedding


def test_fmc_archs_lists_families_and_presets_without_tvm(capsys):
    from test_build import imports_tvm

    from fmc.cli import main

    assert imports_tvm(["archs"]) is False
    assert main(["archs", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["qwen3"]["hf_model_types"] == ["qwen3"]
    assert rows["qwen3"]["gguf_architectures"] == ["qwen3"]
    assert rows["qwen3"]["presets"] == ["qwen3-0.6b", "qwen3-8b"]
    assert "smollm2-135m" in rows["llama"]["presets"]
    assert rows["mistral"]["gguf_architectures"] == []
    assert main(["archs", "--arch-plugin", str(EXAMPLE), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny_scaled_llama"]["presets"] == ["tiny-scaled-llama"]
    assert main(["archs"]) == 0
    assert "qwen3-0.6b" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3-bias", "qwen3-tied"])
def test_qwen3_gguf_matches_transformers(name, tiny_checkpoint, tmp_path):
    """A qwen3 GGUF written as llama.cpp writes one (attn_q_norm/attn_k_norm, no Q/K
    permutation, head_dim as key_length, tied when output.weight is absent) compiles to the
    checkpoint's logits."""
    checkpoint = tiny_checkpoint(name)
    path = write_gguf_from_checkpoint(checkpoint, tmp_path / f"{name}.gguf")
    source = open_model(str(path))
    hf_config = json.loads((checkpoint / "config.json").read_text())
    config = source.config
    assert (config.architecture, config.qk_norm, config.head_dim) == \
        ("qwen3", True, hf_config["head_dim"])
    assert config.qkv_bias == config.o_bias == hf_config["attention_bias"]
    assert config.tie_word_embeddings == hf_config["tie_word_embeddings"]
    assert "model.layers.1.self_attn.k_norm.weight" in source.weights.index()
    out = tmp_path / "artifact"
    compile_model(CompileOptions(model=str(path), output=out))
    matches_prefill_and_decode(fmc.load(out), hf_model(checkpoint), steps=4)
    # no template in the file: the family's default (ChatML)
    tokenizer_config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]


def test_qwen3_q4f16_equals_transformers_on_the_dequantized_weights(tiny_checkpoint,
                                                                    tiny_artifact, capsys):
    """Quantized (the q/k norms and biases stay float): every fused kernel computes what
    transformers computes with the artifact's dequantized weights. `fmc inspect` names the
    family's features."""
    from test_quant import dequantized_state, hf_logits_with

    from fmc.cli import main

    artifact = tiny_artifact("qwen3-bias", "q4f16")
    expected = hf_logits_with(tiny_checkpoint("qwen3-bias"), dequantized_state(artifact),
                              PROMPT)
    assert relative_error(fmc.load(artifact).logits(PROMPT), expected) <= TOLERANCE
    assert main(["inspect", str(artifact), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "qwen3"
    assert summary["features"] == ["per-head q/k RMSNorm", "q/k/v, o biases", "head_dim 32",
                                   "untied embeddings"]


def test_qwen3_without_its_qk_norm_fails_the_comparison(tiny_checkpoint, tiny_artifact,
                                                        tmp_path, fmc_log):
    """Negative control: the same checkpoint compiled with the per-head q/k norm switched
    off (registered in-process) is far from transformers; the real one is within bound."""
    changed_config_fails_the_comparison(
        "qwen3", lambda config: dataclasses.replace(config, qk_norm=False),
        tiny_checkpoint("qwen3-bias"), tiny_artifact("qwen3-bias"), tmp_path / "no-norm")
    assert "ignoring 4 checkpoint tensor(s)" in fmc_log.text  # the q/k norm weights


def _plugin_checkpoint(tiny_checkpoint, directory: Path, multiplier: float) -> Path:
    """A llama checkpoint declared as the plugin's model_type with its extra key."""
    shutil.copytree(tiny_checkpoint("llama-gqa-untied"), directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tiny_scaled_llama", embedding_multiplier=multiplier)
    config.pop("architectures", None)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_arch_plugin_compiles_a_users_architecture(tiny_checkpoint, tmp_path):
    """examples/arch_plugin_tiny.py, given to `fmc compile --arch-plugin` in a process
    started outside the package, compiles its architecture: the logits are transformers'
    llama with the embedding table scaled by the multiplier (what scaling the embeddings
    computes, the output layer being untied)."""
    checkpoint = _plugin_checkpoint(tiny_checkpoint, tmp_path / "scaled", 3.0)
    with pytest.raises(InputError, match="model_type 'tiny_scaled_llama' is not supported; "
                                         f"supported: {', '.join(registry.model_types())}$"):
        open_model(str(checkpoint))
    out = tmp_path / "artifact"
    run = subprocess.run([sys.executable, "-m", "fmc", "--quiet", "compile", str(checkpoint),
                          "--arch-plugin", str(EXAMPLE), "-o", str(out), "--no-cache"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "tiny_scaled_llama"
    assert manifest["model"]["arch_options"] == {"embedding_multiplier": 3.0}

    model = hf_model(tiny_checkpoint("llama-gqa-untied"))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
    matches_prefill_and_decode(fmc.load(out), model, steps=3)


def test_arch_plugin_is_scoped_to_its_compile_and_keys_the_cache(tiny_checkpoint, tmp_path):
    """In-process: the plugin's family exists during its compile only; the build cache hits
    on an identical rebuild and misses both steps when the plugin file changes."""
    checkpoint = _plugin_checkpoint(tiny_checkpoint, tmp_path / "scaled", 2.0)
    plugin = tmp_path / "plugin.py"
    shutil.copy(EXAMPLE, plugin)

    def compile_(name):
        return compile_model(CompileOptions(model=str(checkpoint), output=tmp_path / name,
                                            arch_plugins=[str(plugin)], use_cache=True,
                                            cache_dir=tmp_path / "cache")).cache

    assert compile_("a") == {"library": "miss", "weights": "miss"}
    assert "tiny_scaled_llama" not in registry.ARCHITECTURES
    assert compile_("b") == {"library": "hit", "weights": "hit"}
    plugin.write_text(plugin.read_text() + "\n# changed\n")
    assert compile_("c") == {"library": "miss", "weights": "miss"}


def test_bad_arch_plugins_are_clear_errors(bad_plugins):
    broken, empty = bad_plugins
    with pytest.raises(InputError, match="broken.py: architecture plugin failed to load: "
                                         "RuntimeError: boom"):
        registry.load_plugin(broken)
    with pytest.raises(InputError, match="empty.py: registers no architecture"):
        registry.load_plugin(empty)


def test_an_unknown_gguf_architecture_names_the_supported_ones(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    supported = registry.gguf_architectures()
    assert {"llama", "qwen2", "qwen3", "gemma2", "gemma3"} <= set(supported)
    with pytest.raises(InputError, match=r"other\.gguf: GGUF architecture 'rwkv6' is not "
                                         rf"supported; supported: {', '.join(supported)}$"):
        open_model(str(path))
