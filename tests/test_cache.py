"""The build cache: what hits, what misses, what is reused, and what happens to damage."""

from __future__ import annotations

import copy
import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import fmc.compile_cache
import fmc.errors
from fmc.cli import main
from fmc.compiler import CompileOptions, compile_model
from fmc.targets.base import Tool

MODEL = "llama-gqa-untied"


@pytest.fixture
def model(tiny_checkpoint, tmp_path) -> Path:
    """A private copy: the tests change its weights."""
    return Path(shutil.copytree(tiny_checkpoint(MODEL), tmp_path / "model"))


class Compiler:
    def __init__(self, model: Path, root: Path):
        self.model, self.root, self.count = model, root, 0
        self.cache = root / "cache"

    def __call__(self, **options):
        self.count += 1
        out = self.root / f"out{self.count}"
        settings = {"quant": "q4f16", "cache_dir": self.cache, **options}
        result = compile_model(CompileOptions(model=str(self.model), output=out, **settings))
        return out, result.cache


def _same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def _change_one_weight(checkpoint: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = (tensors[name] * 1.5).astype(tensors[name].dtype)
    save_file(tensors, str(path))


def test_each_step_misses_exactly_when_its_inputs_change(model, tmp_path, monkeypatch):
    compile_ = Compiler(model, tmp_path)
    first, status = compile_()
    assert status == {"library": "miss", "weights": "miss"}
    again, status = compile_()
    assert status == {"library": "hit", "weights": "hit"}
    assert _same_files(first, again)  # restored products = built ones, byte for byte
    uncached, status = compile_(use_cache=False)
    assert status == {} and _same_files(first, uncached)
    # Runtime settings live in the manifest only.
    assert compile_(context_window=64)[1] == {"library": "hit", "weights": "hit"}
    # Another CPU: a new library; the converted weights (same layout) are reused.
    other_cpu, status = compile_(target="cpu:skylake-avx512")
    assert status == {"library": "miss", "weights": "hit"}
    assert filecmp.cmp(first / "params/shard-00000.safetensors",
                       other_cpu / "params/shard-00000.safetensors", shallow=False)
    assert compile_(quant="q8f16")[1] == {"library": "miss", "weights": "miss"}
    # Another split: another library (the local view) and other shards; then both cached.
    compile_(quant="q0f32")
    assert compile_(quant="q0f32", tensor_parallel=2)[1] == {"library": "miss", "weights": "miss"}
    sharded, status = compile_(quant="q0f32", tensor_parallel=2)
    assert status == {"library": "hit", "weights": "hit"}
    assert (sharded / "params/rank-1/shard-00000.safetensors").is_file()

    # New weights: the library is reused, the weights are converted again.
    _change_one_weight(model)
    changed, status = compile_()
    assert status == {"library": "hit", "weights": "miss"}
    assert not filecmp.cmp(first / "params/shard-00000.safetensors",
                           changed / "params/shard-00000.safetensors", shallow=False)
    assert compile_()[1] == {"library": "hit", "weights": "hit"}

    # A host tool's version (g++ links the CPU library) is part of the library's key.
    with monkeypatch.context() as patch:
        patch.setattr(Tool, "version", lambda self: "g++ 99.0")
        assert compile_()[1] == {"library": "miss", "weights": "hit"}
    # Another fmc (code or version), another TVM: nothing is reused.
    with monkeypatch.context() as patch:
        patch.setattr(fmc.compile_cache, "fmc_fingerprint", lambda: "0.0.0+other")
        assert compile_()[1] == {"library": "miss", "weights": "miss"}
    with monkeypatch.context() as patch:
        import tvm

        patch.setattr(tvm, "__version__", "0.0.0")
        assert compile_()[1] == {"library": "miss", "weights": "miss"}


def test_plugin_file_content_is_part_of_both_keys(model, tmp_path):
    compile_ = Compiler(model, tmp_path)
    plugin = tmp_path / "int3.py"
    shutil.copy(Path(__file__).parent.parent / "examples" / "quant_plugin_int3.py", plugin)
    options = {"quant": "int3", "quant_plugins": [str(plugin)]}
    assert compile_(**options)[1] == {"library": "miss", "weights": "miss"}
    assert compile_(**options)[1] == {"library": "hit", "weights": "hit"}
    plugin.write_text(plugin.read_text() + "# edited\n")
    assert compile_(**options)[1] == {"library": "miss", "weights": "miss"}


def test_a_damaged_entry_is_a_miss_and_is_replaced(model, tmp_path, fmc_log):
    compile_ = Compiler(model, tmp_path)
    first, _ = compile_()
    shards = list((compile_.cache / "v1" / "weights").glob("*/files/params/*.safetensors"))
    assert len(shards) == 1
    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 0xFF
    shards[0].write_bytes(data)
    second, status = compile_()
    assert status == {"library": "hit", "weights": "miss"}
    assert "damaged" in fmc_log.text
    assert _same_files(first, second)
    assert main(["verify", str(second)]) == 0
    assert compile_()[1] == {"library": "hit", "weights": "hit"}


def test_cache_commands_environment_and_dry_run(model, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.delenv("FMC_NO_CACHE")
    monkeypatch.setenv("FMC_CACHE_DIR", str(cache))

    def run_json(*args):
        assert main([*args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    compile_args = ["compile", str(model), "-q", "q4f16"]
    assert run_json(*compile_args, "-o", str(tmp_path / "a"))["cache"] == \
        {"library": "miss", "weights": "miss"}
    plan = run_json(*compile_args, "-o", str(tmp_path / "b"), "--dry-run")
    assert plan["cache"] == {"dir": str(cache), "library": "hit", "weights": "hit"}
    plan = run_json(*compile_args, "-o", str(tmp_path / "b"), "--dry-run", "-q", "q8f16")
    assert plan["cache"]["library"] == "miss" and plan["cache"]["weights"] == "unknown"

    listing = run_json("cache", "ls")
    assert listing["cache_dir"] == str(cache)
    assert sorted(e["kind"] for e in listing["entries"]) == ["library", "weights"]
    assert listing["total_bytes"] == sum(e["bytes"] for e in listing["entries"]) > 0
    assert run_json("cache", "clean", "--older-than", "1d")["removed"] == 0
    assert run_json("cache", "clean", "--kind", "library")["removed"] == 1
    assert [e["kind"] for e in run_json("cache", "ls")["entries"]] == ["weights"]
    assert run_json("cache", "clean")["removed"] == 1
    assert run_json("cache", "ls")["entries"] == []

    # --no-cache and FMC_NO_CACHE neither read nor write it.
    assert run_json(*compile_args, "-o", str(tmp_path / "c"), "--no-cache")["cache"] == {}
    monkeypatch.setenv("FMC_NO_CACHE", "1")
    assert run_json(*compile_args, "-o", str(tmp_path / "d"))["cache"] == {}
    assert run_json("cache", "ls")["entries"] == []
    # An explicit --cache-dir wins over FMC_NO_CACHE.
    other = tmp_path / "other-cache"
    assert run_json(*compile_args, "-o", str(tmp_path / "e"), "--cache-dir",
                    str(other))["cache"] == {"library": "miss", "weights": "miss"}
    assert len(run_json("cache", "ls", "--cache-dir", str(other))["entries"]) == 2

    assert main(["cache", "clean", "--older-than", "soon"]) == 2
    assert "--older-than 'soon'" in capsys.readouterr().err


def test_an_unwritable_cache_is_a_warning_not_a_failure(model, tmp_path, fmc_log):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    out = tmp_path / "out"
    result = compile_model(CompileOptions(model=str(model), output=out, cache_dir=blocked))
    assert result.cache == {"library": "miss", "weights": "miss"}
    assert "could not write the build cache" in fmc_log.text
    assert (out / "manifest.json").is_file()


def test_file_digests_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    from fmc.artifacts import cache as cache_mod

    store = cache_mod.BuildCache(tmp_path / "cache")
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    monkeypatch.setattr(cache_mod, "DIGEST_MEMO_MIN_AGE_S", 0.0)
    first = store.file_digest(path)
    assert len(list((store.base / "digests").iterdir())) == 1
    path.write_bytes(b"b" * 1000)  # same size and inode; only the mtime tells
    os.utime(path, ns=(1, 1))
    assert store.file_digest(path) == hashlib.sha256(b"b" * 1000).hexdigest() != first
    assert store.file_digest(path) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(list((store.base / "digests").iterdir())) == 1


def test_in_process_registrations_are_part_of_the_keys(model, tmp_path, monkeypatch):
    """A pass or scheme registered in-process (no file) changes what a compile builds, so it
    must change the key: a later compile must not reuse a library or shards built without
    it."""
    import tvm

    from fmc.lowering import pipeline
    from fmc.quant import registry

    compile_ = Compiler(model, tmp_path)
    assert compile_()[1] == {"library": "miss", "weights": "miss"}
    assert compile_()[1] == {"library": "hit", "weights": "hit"}
    monkeypatch.setattr(pipeline, "PIPELINE", list(pipeline.PIPELINE))
    pipeline.register_pass(pipeline.PassSpec(
        "no-schedule", "lower", "kernels unscheduled", lambda ctx: tvm.transform.Sequential([])),
        replace="schedule")
    assert compile_()[1] == {"library": "miss", "weights": "hit"}

    original = registry.get("q4f16")

    class Changed(type(original)):  # a different quantizer under the same name
        def quantize(self, weight, importance=None):
            return super().quantize(np.sign(weight) * np.abs(weight) ** 0.5)

    changed = copy.copy(original)
    changed.__class__ = Changed
    monkeypatch.setitem(registry.SCHEMES, "q4f16", changed)
    assert compile_()[1] == {"library": "miss", "weights": "miss"}


def test_a_compile_s_plugins_do_not_outlive_it(model, tmp_path, monkeypatch):
    from fmc.lowering import pipeline
    from fmc.quant import all_schemes, registry

    all_schemes()
    monkeypatch.delitem(registry.SCHEMES, "int3", raising=False)  # an earlier test's load

    plugin = Path(__file__).parent.parent / "examples" / "quant_plugin_int3.py"
    passes = Path(__file__).parent.parent / "examples" / "pass_plugin_kernel_report.py"
    before = (pipeline.pass_names(), sorted(all_schemes()))
    compile_ = Compiler(model, tmp_path)
    compile_(quant="int3", quant_plugins=[str(plugin)], pass_plugins=[str(passes)])
    assert (pipeline.pass_names(), sorted(all_schemes())) == before
    # the next compile in this process neither sees the pass nor can use the scheme
    assert "kernel-report" not in pipeline.pass_names()
    with pytest.raises(fmc.errors.UsageError, match="int3"):
        compile_(quant="int3")
