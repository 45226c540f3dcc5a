"""CPU target variants: a cross-compiled aarch64 Linux library, and a raw TVM target given
as JSON (--target-json)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import fmc
from fmc.cli import main
from fmc.compiler import CompileOptions, compile_model
from fmc.targets.cpu import LD_LLD, READELF


@pytest.mark.skipif(not (LD_LLD.path() and READELF.path()),
                    reason="needs ld.lld and llvm-readelf (apt-get install lld llvm)")
def test_aarch64_linux_cross_library(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "arm"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-quant")), output=out,
                                 target="cpu:aarch64-linux", quant="q4f16"))
    library = out / "model.so"
    header = subprocess.run([READELF.path(), "--file-header", str(library)],
                            capture_output=True, text=True, check=True).stdout
    assert "AArch64" in header and "DYN (Shared object file)" in header
    symbols = subprocess.run([READELF.path(), "--dyn-syms", "--wide", str(library)],
                             capture_output=True, text=True, check=True).stdout
    assert "__tvm_ffi__library_bin" in symbols
    target = json.loads((out / "manifest.json").read_text())["target"]
    assert target["spec"] == "cpu:aarch64-linux"
    assert target["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert main(["run", str(out), "--prompt", "hi"]) == 5
    assert "'cpu:aarch64-linux' cannot run on this machine" in capsys.readouterr().err


def test_target_json_compiles_for_exactly_that_target(tiny_checkpoint, tiny_artifact,
                                                      tmp_path):
    out = tmp_path / "json"
    raw = {"kind": "llvm", "mcpu": "x86-64-v3"}
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-mha")), output=out,
                                 target_json=json.dumps(raw)))
    target = json.loads((out / "manifest.json").read_text())["target"]
    assert target["tvm_target"]["mcpu"] == "x86-64-v3"  # AVX2, not this machine's AVX-512
    ids = [3, 14, 15, 92, 65]
    reference = fmc.load(tiny_artifact("llama-mha")).logits(ids)
    np.testing.assert_allclose(fmc.load(out).logits(ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("raw, message", [
    ('{"kind": "llvm", "mcpuu": "x"}', "Unknown config option 'mcpuu'"),
    ('{"kind": "rocm"}', "unknown target kind 'rocm'"),
    ('{"kind"', "not JSON"),
    ('["llvm"]', 'expected an object with a "kind"'),
])
def test_bad_target_json_is_a_usage_error(raw, message, tmp_path, capsys):
    assert main(["compile", "llama-7b", "--target-json", raw, "-o", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("dot", ["float", "int8"])
def test_cpu_build_schedules_every_matmul_and_marks_kernels_noalias(dot, tiny_checkpoint):
    """The lowered CPU module: every kernel declares its buffers distinct (LLVM keeps
    accumulators in registers only then), the decode attention is fmc's, and every matmul
    over row-interleaved weights got the lane-per-row schedule (vectorized row lanes) — or,
    with --cpu-dot int8, every matmul is an integer-dot kernel."""
    from tvm import tirx

    from fmc.compiler import build_ir
    from fmc.lowering.kernels.attention import DECODE_SYMBOL

    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-quant")), quant="q4f16",
                                    target="cpu:icelake-server", cpu_dot=dot))
    kernels = {gv.name_hint: f for gv, f in state.mod.functions_items()
               if isinstance(f, tirx.PrimFunc)}
    assert all(f.attrs and f.attrs.get("tirx.noalias") for f in kernels.values())
    decode = [f for f in kernels.values() if f.attrs.get("global_symbol") == DECODE_SYMBOL]
    assert len(decode) == 1 and "T.parallel" in decode[0].script()
    matmuls = {name: f.script() for name, f in kernels.items() if "_rows16" in name
               and "matmul" in name}
    assert len(matmuls) >= 8
    integer = {name for name, text in matmuls.items() if "vpdpbusd" in text}
    # int8: decode's qkv, o_proj(+add), gate/up, down(+add) GEMVs of the q4f16 layers
    # int8: every matmul — prefill, decode and batched, over the q4f16 layers and the q8f16
    # output head — is an integer-dot kernel
    assert integer == (set(matmuls) if dot == "int8" else set()), sorted(integer)
    for name, text in matmuls.items():
        if name in integer:
            assert "T.parallel" in text, name
        else:
            assert "T.vectorized(T.int64(16))" in text and "T.parallel" in text, name
