"""`fmc compare`: per-layer activations of a --debug-layers artifact against transformers,
and the first divergence located when one layer's weight is deliberately wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fmc.artifacts.shards import sha256_array, sha256_file
from fmc.cli import main
from fmc.compiler import CompileOptions, compile_model

PERTURBED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def debug_artifact(tiny_checkpoint, tmp_path_factory):
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    out = tmp_path_factory.mktemp("compare") / "debug"
    compile_model(CompileOptions(model=str(checkpoint), output=out, debug_layers=True))
    return checkpoint, out


def perturb(artifact, name: str, factor: float) -> None:
    """Scale one tensor inside its shard and re-sign the manifest, as a buggy compile would
    (the artifact still verifies; only its numbers are wrong)."""
    manifest_path = artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (entry,) = [p for p in manifest["params"] if p["name"] == name]
    shard_path = artifact / entry["shard"]
    tensors = load_file(str(shard_path))
    tensors[name] = (tensors[name] * factor).astype(tensors[name].dtype)
    save_file(tensors, str(shard_path))
    entry["sha256"] = sha256_array(tensors[name])
    for shard in manifest["weights"]["shards"]:
        if shard["file"] == entry["shard"]:
            shard["sha256"] = sha256_file(shard_path)
    manifest_path.write_text(json.dumps(manifest))


def test_compare_agrees_layer_by_layer(debug_artifact, capsys):
    checkpoint, artifact = debug_artifact
    code = main(["compare", str(artifact), str(checkpoint), "--prompt", "hello world the",
                 "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    names = [row["name"] for row in result["rows"]]
    assert names == ["embed", "layer 0", "layer 1", "norm", "logits"]
    assert result["first_divergence"] is None
    assert max(row["max_rel"] for row in result["rows"]) < 1e-4


def test_compare_names_the_perturbed_layer(debug_artifact, tmp_path, capsys):
    checkpoint, artifact = debug_artifact
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    perturb(broken, PERTURBED, 1.05)
    code = main(["compare", str(broken), str(checkpoint), "--prompt", "hello world the"])
    captured = capsys.readouterr()
    assert code == 1
    assert "first divergence at layer 1" in captured.err
    assert "layer 1" in captured.out and "first divergence" in captured.out
    # The default reference is the model the artifact was compiled from.
    assert main(["compare", str(broken), "--prompt", "the", "--json"]) == 1
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert not rows["layer 0"]["exceeds"] and rows["layer 1"]["exceeds"]


def test_compare_needs_a_debug_build(tiny_artifact, tiny_checkpoint, capsys):
    artifact = tiny_artifact("llama-gqa-untied")
    assert main(["compare", str(artifact), str(tiny_checkpoint("llama-gqa-untied"))]) == 2
    assert "built without --debug-layers" in capsys.readouterr().err


def test_layer_outputs_match_the_logits_path(debug_artifact):
    """The debug entry runs the same layers as prefill: its final-norm row, projected by
    the output weight, gives the logits the normal entry computes."""
    import fmc

    _, artifact = debug_artifact
    engine = fmc.load(artifact)
    ids = [3, 17, 42, 99]
    rows = engine.layer_outputs(ids)
    assert rows.shape == (engine.config.num_hidden_layers + 2, len(ids),
                          engine.config.hidden_size)
    manifest = json.loads((artifact / "manifest.json").read_text())
    (entry,) = [p for p in manifest["params"] if p["name"] == "lm_head.weight"]
    lm_head = load_file(str(artifact / entry["shard"]))["lm_head.weight"]
    np.testing.assert_allclose(rows[-1] @ lm_head.T, engine.logits(ids), rtol=1e-4, atol=1e-4)


def test_compare_without_transformers_is_a_missing_toolchain(debug_artifact, monkeypatch,
                                                             capsys):
    import sys

    checkpoint, artifact = debug_artifact
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    assert main(["compare", str(artifact), str(checkpoint)]) == 3
    assert "pip install 'fmc[compare]'" in capsys.readouterr().err
