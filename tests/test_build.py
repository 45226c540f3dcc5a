"""`fmc build` from an fmc.toml: builds, up-to-date skips, exact rebuilds, checked keys."""

from __future__ import annotations

import inspect
import json
import os

import pytest

from fmc.cli import main

TOML = """\
[defaults]
target = "cpu"
output_dir = "out"

[build.tiny-f32]
model = "tiny"
quant = "q0f32"

[matrix.tinyq]
model = "tiny"
quants = ["q4f16", "q8f16"]
targets = ["cpu"]
"""


def imports_tvm(args: list[str]) -> bool:
    """Run `fmc ARGS` in a fresh interpreter; whether TVM got imported."""
    import subprocess
    import sys

    probe = ("import sys\nfrom fmc.cli import main\ncode = main(sys.argv[1:])\n"
             "print(code, 'tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-2] == "0", out
    return out[-1] == "True"


@pytest.mark.parametrize("command", [["quant", "list"], ["targets"], ["archs"], ["--help"]])
def test_listing_commands_do_not_import_tvm(command):
    assert imports_tvm(command) is False


def test_doctor_asks_llvm_for_the_cpu_name_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FMC_CACHE_DIR", str(tmp_path))
    assert imports_tvm(["doctor", "--json"]) is True  # asks TVM's LLVM, keeps the answer
    assert imports_tvm(["doctor", "--json"]) is False


def test_doctor_reads_the_collectives_the_loaded_tvm_reports():
    from fmc.devices.collectives import collectives_in_tvm_build, registered_in_tvm_build
    from fmc.runtime.tensor_parallel import collectives_available

    assert collectives_in_tvm_build() == collectives_available()
    # the reading finds what the wheel does register (Disco's own collectives)
    assert registered_in_tvm_build(["runtime.disco.allreduce", "runtime.disco.no_such"]) == \
        {"runtime.disco.allreduce"}


def _build(capsys, project, *args):
    code = main(["build", "-c", str(project / "fmc.toml"), "--json", *args])
    out = capsys.readouterr().out
    return code, {b["name"]: b["status"] for b in json.loads(out)["builds"]} if code == 0 \
        else None


def test_build_skips_up_to_date_and_rebuilds_what_changed(tiny_checkpoint, tmp_path, capsys,
                                                           monkeypatch):
    import shutil

    # The build cache on, as users have it (a scratch one): a rebuild whose library is
    # unchanged restores it instead of compiling it again.
    monkeypatch.delenv("FMC_NO_CACHE")
    monkeypatch.setenv("FMC_CACHE_DIR", str(tmp_path / "cache"))

    project = tmp_path / "project"
    shutil.copytree(tiny_checkpoint("llama-gqa-untied"), project / "tiny")
    (project / "fmc.toml").write_text(TOML)
    names = {"tiny-f32", "tinyq-q4f16-cpu", "tinyq-q8f16-cpu"}

    assert _build(capsys, project) == (0, dict.fromkeys(names, "built"))
    assert all((project / "out" / n / "manifest.json").is_file() for n in names)
    assert _build(capsys, project) == (0, dict.fromkeys(names, "up-to-date"))
    # A no-op build answers like make: without importing TVM.
    assert imports_tvm(["build", "-c", str(project / "fmc.toml"), "--quiet"]) is False

    # A changed setting rebuilds only that build.
    (project / "fmc.toml").write_text(TOML.replace('quant = "q0f32"',
                                                   'quant = "q0f32"\ncontext_window = 64'))
    code, statuses = _build(capsys, project)
    assert statuses == {"tiny-f32": "built", "tinyq-q4f16-cpu": "up-to-date",
                        "tinyq-q8f16-cpu": "up-to-date"}
    manifest = json.loads((project / "out" / "tiny-f32" / "manifest.json").read_text())
    assert manifest["runtime"]["context_window"] == 64

    # Freshness is content, as in the build cache's keys: a touched but unchanged input
    # changes nothing; a changed one rebuilds every build that reads it (--only limits it).
    weights = project / "tiny" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _build(capsys, project) == (0, dict.fromkeys(names, "up-to-date"))
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last float of the last tensor
    weights.write_bytes(bytes(data))
    assert _build(capsys, project, "--only", "tinyq-q8f16-cpu") == \
        (0, {"tinyq-q8f16-cpu": "built"})
    assert _build(capsys, project) == (0, {"tiny-f32": "built", "tinyq-q4f16-cpu": "built",
                                           "tinyq-q8f16-cpu": "up-to-date"})


@pytest.mark.parametrize("text, message", [
    ('[build.x]\nmodel = "m"\nquantt = "q4f16"\n',
     r"fmc.toml:3: unknown key 'quantt' in \[build.x\] \(did you mean 'quant'\?"),
    ('[build.x]\nprefill_chunk = "big"\n',
     r"fmc.toml:2: build.x.prefill_chunk must be a positive integer, got str"),
    ('[build.x]\ncontext_window = 0\n', r"fmc.toml:2: build.x.context_window must be positive"),
    ('[defaults]\nquant = "q4f16"\n[targets]\nx = 1\n', r"fmc.toml:3: unknown table \[targets\]"),
    ('[defaults]\nquant = "q4f16"\n', r"fmc.toml: defines no builds"),
    ('[build.x\n', r"fmc.toml: "),
    ('[defaults]\nquant = "q4f16"\n[[build]]\nname = "tiny"\nmodel = "m"\n',
     r"fmc.toml:3: build is an array of tables; write one table per build: \[build.NAME\]"),
])
def test_bad_build_files_name_the_key_and_line(text, message, tmp_path, capsys):
    import re

    (tmp_path / "fmc.toml").write_text(text)
    code = main(["build", "-c", str(tmp_path / "fmc.toml")])
    err = capsys.readouterr().err
    assert code == 4 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_unknown_only_name_and_missing_file(tmp_path, capsys):
    (tmp_path / "fmc.toml").write_text(TOML)
    assert main(["build", "-c", str(tmp_path / "fmc.toml"), "--only", "tiny-f33"]) == 2
    assert "did you mean 'tiny-f32'" in capsys.readouterr().err
    assert main(["build", "-c", str(tmp_path / "none.toml")]) == 4
    assert "none.toml: no such file" in capsys.readouterr().err


def test_the_compiler_does_not_load_the_runtime():
    import subprocess
    import sys

    probe = ("import sys, fmc.compiler\n"
             "print(sorted(m for m in sys.modules if m.startswith('fmc.runtime')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_compile_option_is_one_field_for_the_cli_and_fmc_toml(tmp_path):
    """fmc compile's options and fmc.toml's keys come from CompileOptions' metadata: the same
    defaults, and fmc.toml sets plugins, kernel overrides, debug_layers, allow_nonfinite."""
    import dataclasses

    from fmc.cli.compile import compile_command, options_from_cli
    from fmc.options import CompileOptions, described
    from fmc.project.config import BUILD_KEYS, Build
    from fmc.project.runner import compile_options, resolve

    parameters = {p.name for p in inspect.signature(compile_command).parameters.values()}
    own = {"dry_run", "depfile", "cache_dir", "no_cache", "json_out", "quiet"}
    assert parameters == {item.name for item, meta in described()
                          if meta.flags is not None} | own
    assert {"quant_plugins", "pass_plugins", "arch_plugins", "override_kernels",
            "debug_layers", "allow_nonfinite", "cpu_dot", "target_json"} <= set(BUILD_KEYS)
    assert BUILD_KEYS["debug_layers"] == (bool,) and BUILD_KEYS["shard_size"] == (str, int)
    # Nothing given: every field at its default, from the command line and from fmc.toml.
    assert options_from_cli({"output": "o"}) == CompileOptions(output="o")
    assert compile_options({"output": "o"}) == dataclasses.replace(
        CompileOptions(output="o"), force=True)
    (tmp_path / "report.py").write_text("")
    (tmp_path / "kernel.py").write_text("")
    settings = resolve(Build("b", {"output": "out", "pass_plugins": ["report.py"],
                                   "override_kernels": ["decode/k=kernel.py"],
                                   "debug_layers": True, "shard_size": "1MB"}), tmp_path)
    options = compile_options(settings)
    assert options.pass_plugins == [str(tmp_path / "report.py")]
    assert options.override_kernels == [f"decode/k={tmp_path / 'kernel.py'}"]
    assert options.debug_layers is True and options.shard_bytes == 10**6
    # The stamp's key holds the content of every file an option names.
    from fmc.compile_cache import options_key

    key = options_key(options, [], None)
    assert options_key(options, [], None) == key
    (tmp_path / "kernel.py").write_text("# another kernel")
    assert options_key(options, [], None) != key


@pytest.mark.parametrize("text, message", [
    ('[build.x]\ndebug_layers = 1\n', r"build.x.debug_layers must be a boolean"),
    ('[build.x]\ntensor_parallel = true\n', r"build.x.tensor_parallel must be a positive"),
])
def test_booleans_and_numbers_are_told_apart(text, message, tmp_path, capsys):
    import re

    (tmp_path / "fmc.toml").write_text(text)
    assert main(["build", "-c", str(tmp_path / "fmc.toml")]) == 4
    assert re.search(message, capsys.readouterr().err)
