"""The `cuda` target: ahead-of-time multi-arch fatbins built without a GPU or driver, checked
with cuobjdump independently of fmc's own validation."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import pytest

from fmc.cli import main
from fmc.compiler import CompileOptions, build_ir, compile_model
from fmc.errors import ArtifactError
from fmc.targets.cuda import CUDA, extract_fatbins, find_cuobjdump

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="needs nvcc (the CUDA toolkit) on PATH")


def has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cuda_artifact(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny-q4f16"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-quant")), output=out,
                                 target="cuda", quant="q4f16"))
    return out


def listed(kind: str, fatbin_path) -> set[str]:
    out = subprocess.run([find_cuobjdump(), f"--list-{kind}", str(fatbin_path)],
                         capture_output=True, text=True, check=True).stdout
    return {line.rsplit(".", 2)[-2] for line in out.splitlines() if line.strip()}


def test_library_holds_every_default_arch_and_ptx(cuda_artifact, tmp_path):
    (fatbin,) = extract_fatbins((cuda_artifact / "model.so").read_bytes())
    path = tmp_path / "kernels.fatbin"
    path.write_bytes(fatbin)
    assert listed("elf", path) == {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}
    assert listed("ptx", path) == {"sm_90"}
    target = json.loads((cuda_artifact / "manifest.json").read_text())["target"]
    assert target["cuda_archs"] == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
    assert target["ptx"] == "compute_90"
    assert "release" in target["tools"]["nvcc"]
    assert target["validation"]["checked_with"] == "cuobjdump"
    assert target["tvm_target"]["arch"] == "sm_75"  # codegen legal for the oldest arch


def test_every_schemes_fused_kernels_build_a_fatbin(tmp_path):
    """Each built-in scheme's fused dequantize → GEMV kernel (decode; dlight's GEMV rule, whose
    analysis is the scheme-sensitive part) compiles to SASS, and one scheme's GEMM (one arch,
    to keep this quick; Metal builds every scheme's GEMM too)."""
    from test_fused_kernels import SCHEMES, build_linear

    for scheme in SCHEMES:
        for rows in ((1, "rows") if scheme == "q4k" else (1,)):
            executable, _, kernels = build_linear(scheme, "cuda:sm_80", rows)
            library = tmp_path / f"{scheme}-{rows}.so"
            executable.export_library(str(library))
            (fatbin,) = extract_fatbins(library.read_bytes())
            path = tmp_path / f"{scheme}-{rows}.fatbin"
            path.write_bytes(fatbin)
            assert listed("elf", path) == {"sm_80"}, scheme
            assert any(k.startswith("fused_dequantize") for k in kernels), (scheme, kernels)


def test_arch_list_is_configurable(tiny_checkpoint, tmp_path):
    out = tmp_path / "two-archs"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-mha")), output=out,
                                 target="cuda:sm_80,sm_90", quant="q0f16"))
    (fatbin,) = extract_fatbins((out / "model.so").read_bytes())
    (tmp_path / "k.fatbin").write_bytes(fatbin)
    assert listed("elf", tmp_path / "k.fatbin") == {"sm_80", "sm_90"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compute_dtype"] == "float16"


def test_validation_rejects_a_library_without_fatbin(tmp_path):
    library = tmp_path / "model.so"
    library.write_bytes(b"\x7fELF" + b"\0" * 4096)  # what TVM writes when it keeps CUDA source
    with pytest.raises(ArtifactError, match="holds no CUDA fatbin"):
        CUDA().validate(library)


def test_bad_arch_lists_are_usage_errors(capsys, tmp_path):
    for spec in ("cuda:80", "cuda:sm_30", "cuda:"):
        code = main(["compile", "llama-7b", "--target", spec, "-o", str(tmp_path / "x")])
        assert code == 2, spec
    err = capsys.readouterr().err
    assert "architectures are sm_NN" in err and "nothing after" in err


def test_target_skips_passes_its_schedules_cannot_handle(tiny_checkpoint):
    model = str(tiny_checkpoint("llama-quant"))
    state = build_ir(CompileOptions(model=model, target="cuda", quant="q4f16"))
    assert {"inline-dequantize", "fuse-add-norm"} <= state.disabled
    state = build_ir(CompileOptions(model=model, target="cuda", quant="q4f16",
                                    enable_passes=["fuse-add-norm"]))
    assert "fuse-add-norm" not in state.disabled and "inline-dequantize" in state.disabled
    # Every kernel leaves the lower phase scheduled for the GPU (thread-bound loops).
    from tvm import tirx

    unbound = [gv.name_hint for gv, f in state.mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and "threadIdx" not in f.script()
               and "blockIdx" not in f.script() and "compute_symbolic" not in gv.name_hint
               and "shape_func" not in gv.name_hint]
    assert unbound == []


@pytest.mark.skipif(has_driver(), reason="this machine has an NVIDIA driver")
def test_running_without_a_driver_is_a_clear_error(cuda_artifact, capsys):
    assert main(["run", str(cuda_artifact), "--prompt", "hi"]) == 5
    assert "no NVIDIA driver on this machine" in capsys.readouterr().err
