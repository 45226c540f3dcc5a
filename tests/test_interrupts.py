"""Signals, full disks and concurrent builds never leave a half-written artifact.

A compile runs as a real process; when its log says a phase has started, the test sends
SIGINT, SIGTERM or SIGKILL. Afterwards the output path holds a complete artifact that
verifies (the previous one, or the new one if the signal came after the rename) and, once
the next compile has run, no temporary directory is left beside it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmc.cli import main
from fmc.runtime.artifact import verify_artifact

MODEL = "llama-gqa-untied"
PHASES = ("quantize", "fuse", "lower", "codegen", "weights")


def _spawn(checkpoint: Path, output: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "CI": "1", "FMC_NO_CACHE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fmc", "compile", str(checkpoint), "-o",
                             str(output), "--force", *extra], env=env, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def _signal_at(process: subprocess.Popen, phase: str, signum: int) -> str:
    """Send `signum` once the log line of `phase` starting appears; returns the log."""
    log = []
    for line in process.stderr:
        log.append(line)
        if line.startswith(f"fmc: INFO: {phase}: "):
            process.send_signal(signum)
            break
    log.append(process.stderr.read())
    process.wait(timeout=300)
    return "".join(log)


def _leftovers(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.fmc-*"))


@pytest.fixture(scope="module")
def previous(tiny_checkpoint, tmp_path_factory):
    """A checkpoint and a complete artifact already at the output path."""
    checkpoint = tiny_checkpoint(MODEL)
    output = tmp_path_factory.mktemp("interrupts") / "out"
    assert main(["--quiet", "compile", str(checkpoint), "-o", str(output)]) == 0
    return checkpoint, output


def _manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


@pytest.mark.parametrize("signum, code, phase", [
    *((signal.SIGINT, 130, phase) for phase in PHASES),
    (signal.SIGTERM, 143, "fuse"), (signal.SIGTERM, 143, "codegen")])
def test_a_signal_cleans_up_and_keeps_the_previous_artifact(phase, signum, code, previous):
    checkpoint, output = previous
    before = _manifest(output)
    # Another quantization: a new artifact would differ from the previous one.
    process = _spawn(checkpoint, output, "--quant", "q8f16")
    log = _signal_at(process, phase, signum)
    if process.returncode == 0:  # the signal came after the rename: the new one is complete
        assert _manifest(output)["quantization"]["default"] == "q8f16"
    else:
        assert process.returncode == code, log
        assert log.rstrip().endswith("fmc: interrupted"), log
        assert _manifest(output) == before
    assert all(check["ok"] for check in verify_artifact(output)), log
    assert _leftovers(output) == [], log


@pytest.mark.parametrize("phase", ["fuse", "codegen", "weights"])
def test_sigkill_leaves_the_previous_artifact_and_the_next_run_cleans_up(phase, previous):
    checkpoint, output = previous
    before = _manifest(output)
    process = _spawn(checkpoint, output, "--quant", "q8f16")
    log = _signal_at(process, phase, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, log
    assert _manifest(output) == before
    assert all(check["ok"] for check in verify_artifact(output))
    # The next compile to the same path removes what the killed process left.
    assert main(["--quiet", "compile", str(checkpoint), "-o", str(output), "--force"]) == 0
    assert _leftovers(output) == []
    assert all(check["ok"] for check in verify_artifact(output))


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tiny_checkpoint, tmp_path,
                                                          monkeypatch, capsys):
    import fmc.artifacts.shards as shards

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "save_file", full)
    output = tmp_path / "out"
    assert main(["--quiet", "compile", str(tiny_checkpoint(MODEL)), "-o", str(output)]) == 6
    assert capsys.readouterr().err.strip() == \
        f"fmc: error: {output}: no space left on device while writing the artifact " \
        "(nothing was written)"
    assert list(tmp_path.iterdir()) == []


def test_two_builds_of_one_fmc_toml_at_once(tiny_checkpoint, tmp_path):
    """Two `fmc build` processes sharing the build file, the outputs and the cache: both
    succeed, each artifact is built once (the other process waits on its lock and finds it
    up to date), everything verifies and nothing temporary is left."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_checkpoint(MODEL), project / "tiny")
    (project / "fmc.toml").write_text('[matrix.tiny]\nmodel = "tiny"\n'
                                      'quants = ["q0f32", "q4f16"]\ntargets = ["cpu"]\n')
    env = {k: v for k, v in os.environ.items() if k != "FMC_NO_CACHE"}
    env["FMC_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "fmc", "build", "-c", str(project / "fmc.toml"), "--json"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        results.append({b["name"]: b["status"] for b in json.loads(out)["builds"]})
    for name in ("tiny-q0f32-cpu", "tiny-q4f16-cpu"):
        assert sorted(r[name] for r in results) == ["built", "up-to-date"], results
        output = project / "build" / name
        assert all(check["ok"] for check in verify_artifact(output))
        assert _leftovers(output) == []
    assert list((tmp_path / "cache" / "v1" / "tmp").iterdir()) == []
