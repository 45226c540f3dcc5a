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
from fmc.targets.cuda import CUDA, extract_fatbins, find_cuobjdump, gencode_flags

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
    """Also the shape that once ended in an internal error (TIR's CSE on the tree-attention
    kernel): 3 query heads per KV head over 2 ranks."""
    out = tmp_path / "two-archs"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-three-per-kv")), output=out,
                                 target="cuda:sm_80,sm_90", quant="q4f16", tensor_parallel=2))
    (fatbin,) = extract_fatbins((out / "model.so").read_bytes())
    (tmp_path / "k.fatbin").write_bytes(fatbin)
    assert listed("elf", tmp_path / "k.fatbin") == {"sm_80", "sm_90"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compute_dtype"] == "float16" and manifest["tensor_parallel"]["ranks"] == 2


@pytest.mark.parametrize("archs, expected", [
    (("sm_75", "sm_80", "sm_86", "sm_89", "sm_90"),
     ["arch=compute_75,code=[sm_75]", "arch=compute_80,code=[sm_80,sm_86,sm_89]",
      "arch=compute_90,code=[sm_90,compute_90]"]),
    (("sm_90a", "sm_80", "sm_90"),  # arch-specific PTX runs nowhere else: not the one kept
     ["arch=compute_80,code=[sm_80]", "arch=compute_90,code=[sm_90,compute_90]",
      "arch=compute_90a,code=[sm_90a]"]),
    (("sm_89", "sm_86"), ["arch=compute_86,code=[sm_86,sm_89,compute_86]"]),
    (("sm_120", "sm_100"), ["arch=compute_100,code=[sm_100]",
                            "arch=compute_120,code=[sm_120,compute_120]"]),
])
def test_one_front_end_run_per_major_version(archs, expected):
    """nvcc runs its slow front end once per virtual architecture: one per major version."""
    flags = gencode_flags(archs)
    assert flags[::2] == ["-gencode"] * len(expected) and flags[1::2] == expected


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


def test_gpu_schedules_never_load_the_tensor_core_intrinsics(tmp_path):
    """dlight's tensor-core matmul rules import tvm.s_tir.tensor_intrin (minutes of TVMScript
    parsing) before reading `dlight.do_not_tensorize`; fmc declines them, so scheduling a
    matmul for CUDA leaves that module unloaded (a fresh interpreter: nothing else loads it)."""
    import sys

    script = """
import sys, tvm
from tvm.script import tirx as T
from fmc.lowering.passes.schedule_gpu import DlightGPUSchedule, MarkNoTensorize

@T.prim_func(s_tir=True)
def matmul(a: T.Buffer((256, 256), "float16"), b: T.Buffer((256, 256), "float16"),
           c: T.Buffer((256, 256), "float16")):
    for i, j, k in T.grid(256, 256, 256):
        with T.sblock("c"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                c[vi, vj] = T.float16(0)
            c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vj, vk]

with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):
    mod = DlightGPUSchedule()(MarkNoTensorize()(tvm.IRModule({"main": matmul})))
assert mod["main"].attrs["tirx.is_scheduled"], "not scheduled"
print("loaded" if "tvm.s_tir.tensor_intrin" in sys.modules else "not loaded")
"""
    (tmp_path / "schedule.py").write_text(script)  # TVMScript reads its source file
    done = subprocess.run([sys.executable, str(tmp_path / "schedule.py")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["not", "loaded"]
