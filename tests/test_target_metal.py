"""The `metal` target, built on Linux: a macOS arm64 dylib and an iOS static library whose
MSL kernels type-check against fmc's Metal stdlib shim (and a broken kernel does not)."""

from __future__ import annotations

import json
import subprocess

import pytest

from fmc.cli import main
from fmc.compiler import CompileOptions, build_ir, compile_model
from fmc.targets.metal import CLANG, LLD, OBJDUMP, check_msl, metal_source, split_kernels

pytestmark = pytest.mark.skipif(
    not (LLD.path() and CLANG.path() and OBJDUMP.path()),
    reason="needs ld64.lld, clang++ and llvm-objdump (apt-get install lld clang llvm)")


def objdump(*args) -> str:
    return subprocess.run([OBJDUMP.path(), "--macho", *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def metal_kernels(tiny_checkpoint) -> dict[str, str]:
    from tvm import relax

    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-quant")), target="metal",
                                    quant="q4f16"))
    target = state.target.tvm_target()
    with target:
        executable = relax.build(state.mod, target=target, relax_pipeline=None)
    return split_kernels(metal_source(executable))


def test_macos_dylib_is_arm64_mach_o_exporting_the_library(tiny_checkpoint, tmp_path):
    out = tmp_path / "mac"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-quant")), output=out,
                                 target="metal", quant="q4f16"))
    dylib = out / "model.dylib"
    header = objdump("--private-header", str(dylib))
    assert "MH_MAGIC_64" in header and "ARM64" in header and "DYLIB" in header
    exports = objdump("--exports-trie", str(dylib))
    assert "___tvm_ffi__library_bin" in exports  # the VM executable: every entry function
    assert "___tvm_ffi_fused_dequantize" in exports  # kernel launchers
    from fmc.artifacts.abi import ENTRY_FUNCTIONS

    data = dylib.read_bytes()  # the VM program inside the blob names every entry function
    assert all(entry.encode() in data for entry in ENTRY_FUNCTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["library"]["file"] == "model.dylib"
    assert manifest["target"]["validation"]["msl_kernels"] > 30
    assert manifest["compute_dtype"] == "float16"


def test_ios_static_library_registers_its_kernels(tiny_checkpoint, tmp_path):
    out = tmp_path / "ios"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-mha")), output=out,
                                 target="metal:ios", quant="q0f16"))
    archive = out / "model.a"
    header = objdump("--private-header", str(archive))
    assert header.count("ARM64") == 2 and "OBJECT" in header  # lib0.o (host) + devc.o
    assert "__mod_init_func" in objdump("--section-headers", str(archive))


def test_every_generated_kernel_type_checks(metal_kernels):
    assert len(metal_kernels) > 30
    assert check_msl(metal_kernels, CLANG.path()) == []


def test_every_schemes_fused_kernels_type_check():
    """Each built-in scheme's fused dequantize → GEMV (decode) and → GEMM (prefill) kernel,
    generated for Metal, type-checks."""
    from test_fused_kernels import SCHEMES, build_linear

    kernels = {}
    for scheme in SCHEMES:
        for rows in (1, "rows"):
            executable, _, _ = build_linear(scheme, "metal", rows)
            for name, source in split_kernels(metal_source(executable)).items():
                kernels[f"{scheme}_{rows}_{name}"] = source
    assert all(any(k.startswith(f"{s}_") and "dequantize" in k for k in kernels)
               for s in SCHEMES)
    assert check_msl(kernels, CLANG.path()) == []


@pytest.mark.parametrize("break_it, expected", [
    (lambda src: src.replace("simd_shuffle_down(", "simd_shufle_down(", 1), "simd_shufle_down"),
    (lambda src: src.replace("threadgroup_barrier(mem_flags::mem_threadgroup)",
                             "threadgroup_barrier(1)", 1), "threadgroup_barrier"),
    (lambda src: src.replace("half4 condval_1", "half condval_1", 1), "half"),
    (lambda src: src.replace("_ptr [[ buffer(0) ]]", "_pointer [[ buffer(0) ]]", 1),
     "undeclared identifier"),
])
def test_the_check_catches_a_broken_kernel(metal_kernels, break_it, expected):
    """Negative controls: a misspelt call, a bad barrier argument, a half4 stored as half,
    a renamed kernel parameter."""
    broken = {}
    for name, source in metal_kernels.items():
        changed = break_it(source)
        if changed != source:
            broken[name] = changed
            break
    assert broken, "no kernel holds the pattern to break"
    (failure,) = check_msl(broken, CLANG.path())
    assert expected in failure


def test_metal_artifacts_do_not_run_here_and_variants_are_checked(tiny_checkpoint, tmp_path,
                                                                  capsys):
    out = tmp_path / "m"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-mha")), output=out,
                                 target="metal", quant="q0f32"))
    assert main(["run", str(out), "--prompt", "hi"]) == 5
    assert "cannot run on this machine" in capsys.readouterr().err
    assert main(["compile", "llama-7b", "--target", "metal:watchos",
                 "-o", str(tmp_path / "w")]) == 2
    assert "variants are metal (macOS) and metal:ios" in capsys.readouterr().err
