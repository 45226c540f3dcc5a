"""The `fmc` command line: results on stdout, one-line errors with documented exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fmc.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_inspect_run_bench(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    code, stdout, _ = run_cli(capsys, "compile", str(tiny_checkpoint("llama-mha")), "-o",
                              str(out), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["output"] == str(out) and result["weights"] is True
    assert set(result["timings"]) >= {"import", "quantize", "fuse", "lower", "codegen"}

    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["target"] == "cpu" and info["quantization"] == "q0f32"
    assert info["weights_present"] and info["parameters"] == 1 + 2 * 6 + 1 + 1
    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "memory estimate" in stdout

    code, stdout, _ = run_cli(capsys, "run", str(out), "--prompt", "w5 w7 w9",
                              "--max-tokens", "6")
    words = stdout.split()
    assert code == 0 and 1 <= len(words) <= 6 and all(w.startswith("w") for w in words)

    code, stdout, _ = run_cli(capsys, "bench", str(out), "--json", "--runs", "2",
                              "--prompt-len", "8", "--gen-len", "4")
    bench = json.loads(stdout)
    assert code == 0 and bench["decode_tokens_per_s"]["median"] > 0
    assert bench["peak_rss_bytes"] > 0

    code, stdout, _ = run_cli(capsys, "bench", str(out), "--json", "--runs", "1",
                              "--prompt-len", "8", "--gen-len", "3", "--profile")
    profile = json.loads(stdout)["profile"]
    assert code == 0 and profile["decode_steps"] == 3
    decode = {row["kernel"]: row for row in profile["decode"]["kernels"]}
    # Every decode step runs the output projection once and each layer's attention once.
    lm_head = [row for name, row in decode.items() if "matmul" in name
               and row["calls_per_step"] == 1]
    assert lm_head and all(row["us_per_call"] > 0 for row in lm_head)
    assert decode["vm.builtin.attention_kv_cache_attention_with_fused_qkv"][
        "calls_per_step"] == 2  # llama-mha has two layers
    assert 0 < profile["decode"]["kernels_ms"] <= profile["decode"]["step_ms"] * 1.05
    assert profile["prefill"]["kernels"][0]["ms_per_step"] > 0


def test_sampling_is_reproducible_with_a_seed(tiny_artifact, capsys):
    art = str(tiny_artifact("llama-mha"))
    args = ["run", art, "-p", "w3 w4", "-n", "8", "--temperature", "1.5", "--seed", "7"]
    first = run_cli(capsys, *args)[1]
    assert run_cli(capsys, *args)[1] == first
    # temperature and seed are used: greedy, another seed and another temperature with the
    # same seed each give another text
    greedy = run_cli(capsys, "run", art, "-p", "w3 w4", "-n", "8")[1]
    other_seed = run_cli(capsys, *args[:-1], "8")[1]
    cooler = run_cli(capsys, *args[:6], "--temperature", "0.4", "--seed", "7")[1]
    assert first != greedy and first != other_seed and first != cooler


def test_top_k_one_and_a_tiny_top_p_sample_the_greedy_text(tiny_artifact, capsys):
    """At a high temperature, top-k 1 and top-p 1e-6 leave only the likeliest token: the
    greedy text whatever the seed, while plain sampling with those seeds is not greedy."""
    base = ["run", str(tiny_artifact("llama-mha")), "-p", "w3 w4", "-n", "8", "--ignore-eos"]
    greedy = run_cli(capsys, *base)[1]
    sampled = set()
    for seed in ("1", "2", "3"):
        hot = [*base, "--temperature", "2", "--seed", seed]
        sampled.add(run_cli(capsys, *hot)[1])
        assert run_cli(capsys, *hot, "--top-k", "1")[1] == greedy
        assert run_cli(capsys, *hot, "--top-p", "1e-6")[1] == greedy
    assert greedy not in sampled and len(sampled) > 1


def test_top_k_and_top_p_sampling_repeat_with_a_seed_and_vary_with_another(tiny_artifact,
                                                                          capsys):
    base = ["run", str(tiny_artifact("llama-mha")), "-p", "w3 w4", "-n", "8", "--ignore-eos",
            "--temperature", "2"]
    for limit in (["--top-k", "4"], ["--top-p", "0.9"]):
        texts = [run_cli(capsys, *base, *limit, "--seed", seed)[1] for seed in ("5", "5", "6")]
        assert texts[0] == texts[1] != texts[2], limit


@pytest.mark.parametrize("args, code, message", [
    (["compile", "llama-7b", "-o", "{tmp}/x", "--quant", "q4f17"], 2,
     "unknown quantization scheme 'q4f17'"),
    (["compile", "llama-7b", "-o", "{tmp}/x", "--target", "cpux"], 2, "unknown target 'cpux'"),
    (["compile", "{tmp}/nope", "-o", "{tmp}/x"], 4, "no such file or directory"),
    (["compile", "llama-7b", "-o", "{tmp}", "--quant", "q0f32"], 6, "already exists"),
    (["compile", "llama-7b", "-o", "{tmp}/x", "--disable-pass", "legalize"], 2,
     "'legalize' is required"),
    (["compile", "llama-7b", "-o", "{tmp}/x", "--quant-override", "lm_head"], 2,
     "expected PATTERN=SCHEME"),
    (["run", "{tmp}", "--prompt", "hi"], 5, "manifest.json: missing"),
    (["inspect", "{tmp}/none"], 5, "not an artifact directory"),
])
def test_errors_are_one_line_with_exit_codes(args, code, message, tmp_path, capsys):
    got, stdout, stderr = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert got == code
    errors = [line for line in stderr.splitlines() if not line.startswith("fmc: INFO: ")]
    assert len(errors) == 1 and errors[0].startswith("fmc: error: "), stderr
    assert message in errors[0]
    assert not (tmp_path / "x").exists()


def test_console_script_exit_code(tmp_path):
    fmc = shutil.which("fmc") or str(__import__("pathlib").Path(sys.executable).parent / "fmc")
    done = subprocess.run([fmc, "inspect", str(tmp_path / "missing")], capture_output=True,
                          text=True)
    assert done.returncode == 5
    assert done.stderr.strip().startswith("fmc: error:") and "Traceback" not in done.stderr
    assert subprocess.run([fmc, "--help"], capture_output=True).returncode == 0


def test_targets_lists_toolchains_and_what_is_missing(capsys, monkeypatch, tmp_path):
    from fmc.cli import main

    assert main(["targets", "--json"]) == 0
    (cpu,) = [t for t in json.loads(capsys.readouterr().out) if t["name"] == "cpu"]
    assert cpu["ready"] and cpu["tools"][0]["version"]
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: the linker is reported missing
    assert main(["targets", "--json"]) == 0
    (cpu,) = [t for t in json.loads(capsys.readouterr().out) if t["name"] == "cpu"]
    assert not cpu["ready"] and cpu["tools"][0]["path"] is None
    assert "apt-get install g++" in cpu["tools"][0]["install"]


def test_command_line_mistakes_are_usage_errors_not_internal_errors(capsys):
    from fmc.cli import main

    assert main(["compile", "llama-7b", "--bogus"]) == 2
    assert main(["compile", "llama-7b"]) == 2  # no -o
    err = capsys.readouterr().err
    assert "No such option: --bogus" in err and "Missing option" in err
    assert "internal error" not in err


@pytest.mark.parametrize("target, tool, hint", [
    ("vulkan", "glslc", "apt-get install glslc"),
    ("metal", "ld64.lld", "apt-get install lld"),
    ("cuda", "nvcc", "install the CUDA toolkit"),
])
def test_missing_toolchain_names_the_tool_and_exits_3(target, tool, hint, monkeypatch, tmp_path,
                                                      capsys):
    from fmc.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no compilers, linkers or shader tools
    assert main(["compile", "llama-7b", "--target", target, "-o", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert f"{tool} not found on PATH" in err and hint in err
    assert not (tmp_path / "out").exists()


def test_verify_passes_a_good_artifact_and_names_a_corrupt_shard(tiny_artifact, tmp_path,
                                                                 capsys):
    import shutil

    good = tiny_artifact("llama-mha")
    code, stdout, _ = run_cli(capsys, "verify", str(good), "--json")
    result = json.loads(stdout)
    assert code == 0 and result["ok"]
    assert [c["check"] for c in result["checks"]] == ["manifest", "file hashes", "tensors",
                                                      "library"]
    assert all(c["ok"] for c in result["checks"])

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    shard = sorted((bad / "params").glob("*.safetensors"))[0]
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, stdout, _ = run_cli(capsys, "verify", str(bad), "--json")
    result = json.loads(stdout)
    assert code == 5 and not result["ok"]
    assert result["checks"][-1]["check"] == "file hashes"
    assert shard.name in result["checks"][-1]["detail"]
    code, _, stderr = run_cli(capsys, "verify", str(bad))
    assert code == 5 and shard.name in stderr and "sha256 mismatch" in stderr


def test_verify_checks_tensors_against_the_manifest(tiny_artifact, tmp_path, capsys):
    """A manifest edited to claim another shape (hashes re-signed) fails at the tensor check."""
    import shutil

    from fmc.artifacts.manifest import dumps

    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact("llama-mha"), bad)
    manifest_path = bad / "manifest.json"
    manifest_path.chmod(0o644)
    manifest = json.loads(manifest_path.read_text())
    manifest["params"][0]["shape"] = [1, *manifest["params"][0]["shape"][1:]]
    manifest_path.write_text(dumps(manifest))
    code, stdout, _ = run_cli(capsys, "verify", str(bad), "--json")
    result = json.loads(stdout)
    assert code == 5 and result["checks"][-1]["check"] == "tensors"
    assert manifest["params"][0]["name"] in result["checks"][-1]["detail"]


def test_doctor_reports_versions_cache_and_toolchains(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FMC_CACHE_DIR", str(tmp_path / "cache"))
    code, stdout, _ = run_cli(capsys, "doctor", "--json")
    report = json.loads(stdout)
    assert code == 0
    assert report["tvm"] == "0.27.0.post1" and report["fmc"]
    assert report["cache_dir"] == {"path": str(tmp_path / "cache"), "exists": False}
    assert report["cpu"]["default_threads"] >= 1 and report["cpu"]["llvm_cpu"]
    assert {"cpu", "cuda", "metal", "vulkan"} <= set(report["targets"])
    assert report["targets"]["cpu"]["ready"]  # g++ is a test prerequisite
    # the PyPI wheel's Disco has no NCCL: what a multi-GPU user must know before running
    assert report["tensor_parallel_collectives"] == {"nccl": False, "rccl": False,
                                                     "fmc-cpu": True}
    code, stdout, _ = run_cli(capsys, "doctor")
    assert code == 0 and "cache:" in stdout and "cpu" in stdout


def test_dry_run_plans_without_writing_and_matches_the_real_compile(tiny_checkpoint, tmp_path,
                                                                     capsys):
    model, out = str(tiny_checkpoint("llama-gqa-untied")), tmp_path / "art"
    args = ["compile", model, "--quant", "q4f16", "-o", str(out), "--depfile",
            str(tmp_path / "art.d")]
    code, stdout, _ = run_cli(capsys, *args, "--dry-run", "--json")
    plan = json.loads(stdout)
    assert code == 0 and not out.exists() and not (tmp_path / "art.d").exists()
    assert [p["name"] for p in plan["phases"]][:2] == ["import", "quantize"]
    assert plan["files"][0] == "model.so" and plan["files"][-1] == "manifest.json"
    memory = plan["memory"]
    assert sum(memory["weights_bytes_per_scheme"].values()) == memory["weights_bytes"]
    assert set(memory["weights_bytes_per_scheme"]) >= {"q4f16", "q8f16"}
    assert any(path.endswith("model.safetensors") for path in plan["input_files"])

    code, _, _ = run_cli(capsys, *args, "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0
    assert {k: v for k, v in memory.items() if k != "weights_bytes_per_scheme"} == \
        manifest["memory"]
    assert sorted(p.name for p in (out / "params").iterdir()) == \
        [f.split("/")[1] for f in plan["files"] if f.startswith("params/")]
    code, stdout, _ = run_cli(capsys, *args[:-2], "--dry-run")
    assert code == 0 and "memory estimate" in stdout and "q4f16" in stdout


def test_run_json_and_global_quiet(tiny_artifact, capsys):
    art = str(tiny_artifact("llama-mha"))
    code, stdout, _ = run_cli(capsys, "run", art, "-p", "w3 w4", "-n", "5", "--json")
    result = json.loads(stdout)
    assert code == 0 and result["prompt_tokens"] == 2 and len(result["token_ids"]) <= 5
    assert result["text"].split() == [f"w{i}" for i in result["token_ids"]][:len(
        result["text"].split())]
    # A preset has no tokenizer: compile warns, unless the global --quiet is given.
    plan = ["compile", "llama-7b", "-o", "unused", "--dry-run"]
    assert "no tokenizer files" in run_cli(capsys, *plan)[2]
    code, _, stderr = run_cli(capsys, "--quiet", *plan)
    assert code == 0 and stderr == ""


def test_every_command_has_json_and_quiet():
    import typer.main

    from fmc.cli import app, register_commands

    register_commands()

    def leaves(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from leaves(sub, [*path, name]) if hasattr(sub, "commands") else \
                [([*path, name], sub)]

    commands = list(leaves(typer.main.get_command(app), []))
    assert len(commands) >= 14
    for path, command in commands:
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"--json", "--quiet"} <= options, " ".join(path)


def test_debug_is_the_global_option_not_any_argument_spelled_so(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    # A prompt that reads "--debug" is a prompt: the error stays one line.
    assert main(["run", missing, "-p", "--debug"]) != 0
    assert capsys.readouterr().err.startswith("fmc: error: ")
    from fmc.errors import FmcError

    with pytest.raises(FmcError):  # the real option shows the traceback (raises here)
        main(["--debug", "run", missing, "-p", "hi"])
