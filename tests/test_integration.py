"""The Makefile example (examples/Makefile) with real `make`: depfiles drive rebuilds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from models import write_tiny_checkpoint

EXAMPLE = Path(__file__).parent.parent / "examples" / "Makefile"


def _make(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # With the build cache on, as users have it (a scratch one): a rebuild of unchanged
    # content restores the products instead of compiling them again.
    env = {key: value for key, value in os.environ.items() if key != "FMC_NO_CACHE"}
    env["FMC_CACHE_DIR"] = str(workdir / "cache")
    return subprocess.run(["make", "-f", str(EXAMPLE), f"FMC={sys.executable} -m fmc.cli",
                           f"MODELS={workdir / 'models'}", f"BUILD={workdir / 'build'}", *args],
                          cwd=workdir, capture_output=True, text=True, check=True, env=env)


def _manifest_times(build: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(build.glob("*/manifest.json"))}


def test_make_builds_once_and_rebuilds_exactly_what_an_input_touches(tmp_path):
    write_tiny_checkpoint("llama-gqa-untied", tmp_path / "models" / "a")
    write_tiny_checkpoint("llama-mha", tmp_path / "models" / "b")
    build = tmp_path / "build"

    first = _make(tmp_path)
    assert first.stdout.count("fmc.cli compile") == 3
    built = _manifest_times(build)
    assert set(built) == {"a-q0f32", "a-q4f16", "b-q4f16"}
    assert (build / "a-q4f16.d").read_text().startswith(f"{build / 'a-q4f16' / 'manifest.json'}:")

    second = _make(tmp_path)
    assert "compile" not in second.stdout and _manifest_times(build) == built

    weights = tmp_path / "models" / "a" / "model.safetensors"
    later = max(built.values()) + 10**9
    os.utime(weights, ns=(later, later))
    third = _make(tmp_path)
    assert third.stdout.count("fmc.cli compile") == 2
    rebuilt = _manifest_times(build)
    assert rebuilt["b-q4f16"] == built["b-q4f16"]
    assert rebuilt["a-q0f32"] > built["a-q0f32"] and rebuilt["a-q4f16"] > built["a-q4f16"]


def test_github_actions_example_parses_and_its_fmc_commands_exist(tmp_path, monkeypatch):
    """Every `fmc …` line of examples/github-actions.yml names a real command; the ones
    without shell variables run as written (against a scratch cache)."""
    import re
    import shlex

    import yaml

    from fmc.cli import main

    workflow = yaml.safe_load((EXAMPLE.parent / "github-actions.yml").read_text())
    steps = workflow["jobs"]["build"]["steps"]
    scripts = "\n".join(step.get("run", "") for step in steps)
    commands = re.findall(r"(?:^|[;&|]\s*|do\s+)fmc\s+([^;\n>]+)", scripts, re.MULTILINE)
    assert {c.split()[0] for c in commands} >= {"doctor", "verify", "cache"}
    monkeypatch.setenv("FMC_CACHE_DIR", str(tmp_path / "cache"))
    for command in commands:
        args = shlex.split(command)
        if "$" in command:
            assert main([args[0], "--help"]) == 0, command
        else:
            assert main(args) == 0, command
