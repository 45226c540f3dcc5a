"""Artifacts: manifest hashes, shards, atomic publication, weights-free builds, load checks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

import fmc
from fmc.artifacts.abi import ABI_VERSION
from fmc.artifacts.safetensors_reader import SafetensorsFile
from fmc.artifacts.shards import sha256_array, sha256_file
from fmc.compiler import PHASES, CompileOptions, compile_model
from fmc.errors import ArtifactError, InputError, OutputError


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".fmc-tmp-" in p.name or ".fmc-old-" in p.name]


def test_manifest_hashes_match_the_files(tiny_artifact):
    out = tiny_artifact("llama-gqa-untied")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["abi_version"] == ABI_VERSION
    assert manifest["library"]["sha256"] == sha256_file(out / manifest["library"]["file"])
    for shard in manifest["weights"]["shards"]:
        assert sha256_file(out / shard["file"]) == shard["sha256"]
    for entry in manifest["params"]:
        array = SafetensorsFile(out / entry["shard"]).load(entry["name"])
        assert list(array.shape) == entry["shape"] and str(array.dtype) == entry["dtype"]
        assert sha256_array(array) == entry["sha256"]
    memory = manifest["memory"]
    assert memory["weights_bytes"] == sum(p["bytes"] for p in manifest["params"])
    assert memory["total_bytes"] > memory["weights_bytes"] + memory["kv_cache_bytes"]


def test_shard_cap_splits_weights(tiny_checkpoint, tiny_artifact, tmp_path):
    out = tmp_path / "sharded"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-gqa-untied")), output=out,
                                 shard_bytes=40_000))
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["weights"]["shards"]
    assert len(shards) > 3
    largest = max(p["bytes"] for p in manifest["params"])
    assert all(s["bytes"] <= max(40_000, largest) + 4096 for s in shards)
    ids = [1, 2, 3, 4, 5]
    reference = fmc.load(tiny_artifact("llama-gqa-untied")).logits(ids)
    np.testing.assert_array_equal(fmc.load(out).logits(ids), reference)


def test_failed_compile_leaves_nothing(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    source = tiny_checkpoint("llama-mha")
    (broken / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="model.layers.1.mlp.up_proj.weight.*missing"):
        compile_model(CompileOptions(model=str(broken), output=out))
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("phase", ["codegen", "weights", "package"])
def test_interrupted_compile_keeps_the_previous_artifact(phase, tiny_checkpoint, tmp_path,
                                                         monkeypatch):
    out = tmp_path / "out"
    model = str(tiny_checkpoint("llama-mha"))
    compile_model(CompileOptions(model=model, output=out))
    before = (out / "manifest.json").read_bytes()
    index = next(i for i, p in enumerate(PHASES) if p.name == phase)
    original = PHASES[index]

    def interrupted(state, progress):
        original.run(state, progress)
        raise KeyboardInterrupt

    patched = list(PHASES)
    patched[index] = dataclasses.replace(original, run=interrupted)
    monkeypatch.setattr("fmc.compiler.PHASES", patched)
    with pytest.raises(KeyboardInterrupt):
        compile_model(CompileOptions(model=model, output=out, force=True, quant="q0f16"))
    assert (out / "manifest.json").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_existing_output_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = str(tiny_checkpoint("llama-mha"))
    with pytest.raises(OutputError, match="already exists"):
        compile_model(CompileOptions(model=model, output=out))
    assert (out / "keep.txt").read_text() == "mine"
    compile_model(CompileOptions(model=model, output=out, force=True))
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_stale_temp_dirs_of_dead_processes_are_removed(tiny_checkpoint, tmp_path):
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f".out.fmc-tmp-{proc.pid}-deadbeef"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-mha")),
                                 output=tmp_path / "out"))
    assert not stale.exists()


def _copy_with_an_altered_shard(artifact: Path, out: Path) -> Path:
    """A copy of `artifact` with one byte of its first shard flipped; returns the shard."""
    import shutil

    shutil.copytree(artifact, out)
    shard = next((out / "params").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_altered_shard_is_refused(tiny_artifact, tmp_path):
    out = tmp_path / "copy"
    shard = _copy_with_an_altered_shard(tiny_artifact("llama-mha"), out)
    with pytest.raises(ArtifactError, match=f"{shard.name}: sha256 mismatch"):
        fmc.load(out)
    shard.unlink()
    with pytest.raises(ArtifactError, match=f"{shard.name}: missing"):
        fmc.load(out)


def test_large_artifacts_are_hashed_on_request(tiny_artifact, tmp_path, monkeypatch, capsys):
    """Over the size limit loading skips the hashes (a 7B model would take seconds);
    `--verify` hashes anyway and `--no-verify` never does."""
    import fmc.runtime.artifact as artifact_mod
    from fmc.cli import main

    out = tmp_path / "copy"
    _copy_with_an_altered_shard(tiny_artifact("llama-mha"), out)
    monkeypatch.setattr(artifact_mod, "VERIFY_BY_DEFAULT_BYTES", 0)
    run = ["run", str(out), "--prompt", "w3 w4", "--max-tokens", "1"]
    assert main(run) == 0
    assert main([*run, "--verify"]) == 5
    assert "sha256 mismatch" in capsys.readouterr().err
    monkeypatch.setattr(artifact_mod, "VERIFY_BY_DEFAULT_BYTES", 1 << 40)
    assert main([*run, "--no-verify"]) == 0
    assert main(["bench", str(out), "--verify", "--runs", "1", "--warmup", "0"]) == 5


def test_newer_abi_is_refused(tiny_artifact, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_artifact("llama-mha"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["abi_version"] = ABI_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer than this fmc supports"):
        fmc.load(out)


def test_manifest_round_trips_byte_for_byte(tiny_artifact):
    """Reading and writing back gives the file's own bytes; keys this fmc does not know
    (written by another version) are kept, at the top level and inside entries."""
    from fmc.artifacts.manifest import Manifest, read_manifest

    artifact = tiny_artifact("llama-gqa-untied")
    text = (artifact / "manifest.json").read_text()
    assert read_manifest(artifact).to_json() == text
    data = json.loads(text)
    data["added_later"] = {"x": 1}
    data["library"]["signature"] = "…"
    data["params"][0]["note"] = 3
    data["target"]["future_fact"] = True
    assert json.loads(Manifest.from_json(json.dumps(data)).to_json()) == data


@pytest.mark.parametrize("change, message", [
    (lambda m: m["params"][1].pop("name"), r"manifest\.json: 'params\[1\]\.name' is missing"),
    (lambda m: m["runtime"].__setitem__("page_size", 0),
     r"manifest\.json: 'runtime\.page_size' must be positive"),
    (lambda m: m["weights"]["shards"][0].__setitem__("file", "../x"),
     r"manifest\.json: weights\.shards\[0\]\.file '\.\./x' is not a path inside the "
     r"artifact"),
    (lambda m: m.pop("target"), r"manifest\.json: 'target\.name' is missing"),
    (lambda m: m.__setitem__("library", 5), r"manifest\.json: 'library' must be an object"),
    (lambda m: m["model"].__setitem__("head_dim", 0), r"manifest\.json: 'model' is invalid "
     r"\(head_dim must be a positive integer, got 0\)"),
])
def test_a_damaged_manifest_names_the_field(tiny_artifact, tmp_path, change, message):
    import shutil

    out = Path(shutil.copytree(tiny_artifact("llama-mha"), tmp_path / "copy"))
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        fmc.load(out)


_LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical"}


def _literal_reads(source: str, keys: set[str], of: str | None) -> list[str]:
    """Where `source` reads one of `keys` by a string literal: `x["key"]`, `x.get("key")`,
    or — with `of` None — `f("key", …)` (a log call's message is not a read). With `of`,
    only reads from an expression whose text contains `of` (other formats share words such
    as "library" or "target")."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        elif isinstance(node, ast.Call) and node.args:
            method = node.func.attr if isinstance(node.func, ast.Attribute) else None
            is_get = method == "get"
            if (of is not None and not is_get) or method in _LOG_CALLS:
                continue
            target, key = (node.func.value if is_get else node.func), node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and key.value in keys and \
                (of is None or of in ast.unparse(target).lower()):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def _package_sources(*exempt: str):
    root = Path(fmc.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if str(path.relative_to(root.parent)) not in exempt:
            yield path.relative_to(root.parent), path.read_text(encoding="utf-8")


def test_no_manifest_key_is_read_outside_the_manifest_module():
    """The manifest is read through `Manifest`'s fields, never by key: a read by key of a
    manifest (or of manifest.json parsed by hand) anywhere else in fmc/ fails here."""
    import dataclasses

    from fmc.artifacts.manifest import Manifest

    keys = {f.name for f in dataclasses.fields(Manifest)} - {"extra"}
    assert {"library", "params", "weights", "runtime", "target", "model"} <= keys
    bad = 'm = engine.manifest["model"]; read_manifest(p).get("target"); manifest["a"]'
    assert len(_literal_reads(bad, keys, of="manifest")) == 2  # the check can fail
    found = {str(path): reads for path, text in _package_sources("fmc/artifacts/manifest.py")
             if (reads := _literal_reads(text, keys, of="manifest") + _file_names(text))}
    assert found == {}


def _file_names(source: str) -> list[str]:
    """Where `source` spells the manifest's file name instead of naming MANIFEST."""
    import ast

    return [f"line {node.lineno}: 'manifest.json'" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and node.value == "manifest.json"]


def test_entry_names_live_in_the_abi_module():
    """The compiler and the runtime name entry functions by fmc.artifacts.abi's constants."""
    from fmc.artifacts import abi

    names = {*abi.ENTRY_FUNCTIONS, abi.DEBUG_ENTRY, abi.METADATA_FUNCTION}
    bad = ('vm["decode"](x); builder.function("_metadata", []); labels = ("prefill",); '
           'log.exception("decode")')
    assert len(_literal_reads(bad, names, of=None)) == 2  # the check can fail
    found = {str(path): reads for path, text in _package_sources("fmc/artifacts/abi.py")
             if (reads := _literal_reads(text, names, of=None))}
    assert found == {}


def test_weights_free_preset_artifact(tmp_path):
    out = tmp_path / "preset"
    result = compile_model(CompileOptions(model="smollm2-135m", output=out))
    manifest = result.manifest
    assert not manifest.weights.present and manifest.weights.shards == ()
    assert all(p.stored is None for p in manifest.params)
    assert (out / "model.so").stat().st_size > 100_000
    # embed, 6 per layer (2 norms, fused qkv, o, fused gate/up, down), final norm
    assert len(manifest.params) == 1 + 30 * 6 + 1
    assert manifest.memory.weights_bytes == 4 * 134_515_008
    with pytest.raises(ArtifactError, match="weights-free"):
        fmc.load(out)


def test_context_window_is_enforced(tiny_artifact):
    engine = fmc.load(tiny_artifact("llama-mha"), context_window=32)
    from fmc.errors import UsageError

    with pytest.raises(UsageError, match="exceeds the context window"):
        engine.logits(list(range(1, 40)))
    with pytest.raises(UsageError, match="outside the vocabulary"):
        engine.logits([1, 2, 10_000])
    assert os.path.isdir(engine.path)


def test_artifact_files_are_readable_by_others(tiny_artifact):
    """Shards get the same permissions as the manifest (safetensors alone writes 0600)."""
    import stat

    artifact = tiny_artifact("llama-mha")
    manifest_mode = stat.S_IMODE((artifact / "manifest.json").stat().st_mode)
    for shard in (artifact / "params").iterdir():
        assert stat.S_IMODE(shard.stat().st_mode) == manifest_mode


def _file_hashes(directory):
    return {str(p.relative_to(directory)): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_compiling_twice_gives_byte_identical_artifacts(tiny_checkpoint, tmp_path):
    """Same inputs → same bytes in every file (library, shards, manifest, tokenizer), whatever
    the output path. Separate processes: the VM's shape functions used to come out in the
    order of a pointer-keyed hash map, which differs between processes (not within one)."""
    import subprocess
    import sys

    model = str(tiny_checkpoint("llama-gqa-untied"))
    first, second = tmp_path / "a", tmp_path / "elsewhere" / "b"
    for out in (first, second):
        subprocess.run([sys.executable, "-m", "fmc.cli", "compile", model, "--quant", "q4f16",
                        "-o", str(out), "--quiet"], check=True)
    hashes = _file_hashes(first)
    assert {"model.so", "manifest.json"} <= set(hashes)
    assert _file_hashes(second) == hashes


def test_shape_function_stores_are_sorted_unless_dependent():
    from tvm import tirx
    from tvm.script import tirx as T

    from fmc.lowering.passes.canonical_shape_funcs import canonical_order

    @T.prim_func(s_tir=True)
    def shuffled(H: T.Buffer((T.int64(4),), "int64")):
        H[T.int64(3)] = T.int64(2) * H[T.int64(0)]
        H[T.int64(1)] = T.int64(5) * H[T.int64(0)]
        H[T.int64(2)] = T.int64(7) * H[T.int64(0)]

    @T.prim_func(s_tir=True)
    def dependent(H: T.Buffer((T.int64(4),), "int64")):
        H[T.int64(3)] = T.int64(2) * H[T.int64(0)]
        H[T.int64(1)] = T.int64(5) * H[T.int64(3)]

    slots = [int(s.indices[0]) for s in canonical_order(shuffled).body.seq]
    assert slots == [1, 2, 3]
    assert canonical_order(dependent).same_as(dependent)
    assert isinstance(canonical_order(shuffled).body, tirx.SeqStmt)


def test_every_shape_function_of_a_build_is_in_slot_order(tiny_checkpoint):
    """The property that makes the library reproducible, checked on a real build (the
    two-process comparison above only catches an unsorted build when the hash maps of the
    two processes happen to differ)."""
    from tvm import tirx

    from fmc.compiler import build_ir

    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-gqa-untied")),
                                    quant="q4f16"))
    shape_funcs = [f for gv, f in state.mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("shape_func")]
    assert shape_funcs
    for func in shape_funcs:
        stores = list(getattr(func.body, "seq", [func.body]))
        slots = [int(s.indices[0]) for s in stores]
        assert slots == sorted(slots), func.script()
