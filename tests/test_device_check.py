"""scripts/device_check.sh, the GPU check, on the CPU side: its arguments, the clear answer
when there is no NVIDIA GPU, and its comparison and bookkeeping code on CPU artifacts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_check.sh"


def load_script():
    spec = importlib.util.spec_from_file_location("device_check",
                                                  ROOT / "scripts" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_arguments_are_checked(tmp_path):
    assert run().returncode == 2  # OUTDIR is required
    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = run(str(a_file))
    assert done.returncode == 2 and "is not a directory" in done.stderr
    assert "device_check.json" in run("--help").stdout


@pytest.mark.parametrize("nvidia_smi", ["missing", "lists-none"])
def test_no_gpu_is_a_clear_answer_and_still_writes_the_report(tmp_path, nvidia_smi):
    tool = tmp_path / "nvidia-smi"
    if nvidia_smi == "lists-none":  # what nvidia-smi says on a machine whose GPU is gone
        tool.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        tool.chmod(0o755)
    out = tmp_path / "out"
    done = run(str(out), "--nvidia-smi", str(tool))
    assert done.returncode == 7
    assert done.stderr.strip().splitlines()[-1].startswith("device_check: no NVIDIA GPU")
    record = json.loads((out / "device_check.json").read_text())
    assert record["status"] == "no-gpu" and record["steps"] == {}
    assert "no GPU" in (out / "report.txt").read_text()


def test_a_fake_gpu_is_parsed(tmp_path):
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771, 9.0, 570.124.06'\n")
    tool.chmod(0o755)
    assert load_script().gpu_info(str(tool)) == {
        "name": "NVIDIA H200", "memory_mib": 143771, "compute_capability": "9.0",
        "driver": "570.124.06", "count": 1}


def test_the_comparison_of_an_artifact_with_itself_passes(tiny_artifact):
    """compare() on two CPU artifacts: identical ones agree exactly; a different scheme's
    logits are outside the bound and the check fails."""
    check = load_script()
    prompt = [5, 17, 33, 2, 99, 140, 7]
    same = check.compare(tiny_artifact("llama-gqa-untied"), tiny_artifact("llama-gqa-untied"),
                         prompt)
    assert same == {"logits_relative_error": 0.0, "bound": check.TOLERANCE, "passed": True,
                    "greedy_equal": True}
    other = check.compare(tiny_artifact("llama-gqa-untied"),
                          tiny_artifact("llama-mha"), prompt)
    assert other["logits_relative_error"] > check.TOLERANCE and other["passed"] is False


def test_steps_record_errors_and_respect_the_budget(tmp_path):
    check = load_script().Check(tmp_path, budget=3600)
    assert check.step("works", lambda: {"x": 1}) == {"x": 1}
    assert check.step("breaks", lambda: 1 / 0) is None
    check.budget = -1
    assert check.step("late", lambda: 1) is None
    record = json.loads((tmp_path / "device_check.json").read_text())
    assert record["steps"]["works"]["ok"] and not record["steps"]["breaks"]["ok"]
    assert "ZeroDivisionError" in record["steps"]["breaks"]["error"]
    assert record["skipped"] == ["late"]
    report = (tmp_path / "report.txt").read_text()
    assert "FAIL breaks" in report and "skip late" in report


def test_random_checkpoint_has_the_presets_tensors(tmp_path):
    check = load_script()
    config = dict(check.preset_config("llama-3-8b"), hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=100, head_dim=16)
    directory = check.random_checkpoint(config, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["lm_head.weight"].shape == (100, 64) and len(tensors) == 21
    values = np.concatenate([t.ravel().astype(np.float32) for t in tensors.values()])
    assert np.isfinite(values).all() and 0 < np.abs(values).max() < 2 ** -5
    assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 2


def test_the_gemma2_checkpoint_is_one_fmc_reads_whole(tmp_path):
    """Step 7's gemma2 writer, at tiny sizes: fmc imports it as gemma2 with its sliding
    layers, every tensor mapped, and the compiled artifact passes the step's comparison
    against itself."""
    from fmc.compiler import CompileOptions, compile_model
    from fmc.frontend import open_model

    check = load_script()
    assert check.gemma2_config()["sliding_window"] == 8
    config = dict(check.gemma2_config(), hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=5000)
    directory = check.gemma2_checkpoint(config, tmp_path / "gemma2")
    source = open_model(str(directory))
    assert source.config.architecture == "gemma2"
    assert source.config.arch_options["sliding_layers"] == [0]
    assert len(source.weights.index()) == 1 + 2 * 11 + 1
    compile_model(CompileOptions(model=str(directory), output=tmp_path / "a", quant="q4f16"))
    assert check.compare(tmp_path / "a", tmp_path / "a")["passed"]
