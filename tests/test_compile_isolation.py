"""Compiles in one process do not influence each other: the TVM-global hooks a target installs
(the CPU's fast `exp` lowering, the Vulkan code generator) are in effect only around its own
build, `--target-json` changes only its own target object, and a thread setting is not left
in the environment for the next load."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from fmc.targets import get as get_target
from fmc.targets.vulkan import GLSLC, SPIRV_VAL


def exp_of(x: float) -> float:
    """float32 e^x from a kernel built by plain `tvm.compile` for LLVM (no fmc hook)."""
    import tvm
    from tvm import te, tirx

    inp = te.placeholder((16,), "float32")
    out = te.compute((16,), lambda i: tirx.exp(inp[i]))
    kernel = tvm.compile(te.create_prim_func([inp, out]), tvm.target.Target("llvm"))
    result = tvm.runtime.tensor(np.zeros(16, "float32"))
    kernel(tvm.runtime.tensor(np.full(16, x, "float32")), result)
    return float(result.numpy()[0])


def test_the_fast_exp_lowering_is_in_effect_only_inside_a_cpu_build(tiny_artifact):
    # e^-100 is a float32 subnormal: TVM's lowering (libm) returns it, fmc's flushes it to 0
    assert exp_of(-100.0) > 0
    with get_target("cpu").codegen_hooks():
        assert exp_of(-100.0) == 0
        with get_target("cpu").codegen_hooks():  # nested: still fmc's, and no double entry
            assert exp_of(-100.0) == 0
        assert exp_of(-100.0) == 0
    assert exp_of(-100.0) > 0
    manifest = json.loads((tiny_artifact("llama-mha") / "manifest.json").read_text())
    assert manifest["target"]["name"] == "cpu"  # a whole CPU compile ran in this process
    assert exp_of(-100.0) > 0


def test_a_failed_build_puts_the_lowering_back_too():
    with pytest.raises(RuntimeError), get_target("cpu").codegen_hooks():
        raise RuntimeError("a build failing half way")
    assert exp_of(-100.0) > 0


@pytest.mark.skipif(not (GLSLC.path() and SPIRV_VAL.path()),
                    reason="needs glslc and spirv-val (apt-get install glslc spirv-tools)")
def test_a_vulkan_compile_leaves_no_vulkan_code_generator_behind(tiny_artifact):
    import tvm_ffi

    # The wheel has no Vulkan code generator: fmc's is TVM's only inside its own build.
    vulkan = get_target("vulkan")
    with vulkan.codegen_hooks():
        assert tvm_ffi.get_global_func("target.build.vulkan", allow_missing=True) is not None
    assert tvm_ffi.get_global_func("target.build.vulkan", allow_missing=True) is None
    artifact = tiny_artifact("llama-quant", "q4f16", "vulkan")
    assert tvm_ffi.get_global_func("target.build.vulkan", allow_missing=True) is None
    # A later CPU compile is untouched by it: no SPIR-V, and its own lowering only.
    cpu = json.loads((tiny_artifact("llama-quant", "q4f16") / "manifest.json").read_text())
    assert "spirv_kernels" not in cpu["target"]["validation"]
    vulkan_manifest = json.loads((artifact / "manifest.json").read_text())
    assert vulkan_manifest["target"]["validation"]["spirv_kernels"] > 0


def test_target_json_changes_only_its_own_target_object():
    from fmc.targets.cpu import HostCPU
    from fmc.targets.registry import from_json

    exact = from_json(json.dumps({"kind": "llvm", "mcpu": "x86-64"}))
    assert str(exact.tvm_target().attrs["mcpu"]) == "x86-64"
    assert HostCPU.exact_tvm_target is None
    plain = get_target("cpu")
    assert plain.exact_tvm_target is None
    assert str(plain.tvm_target().attrs["mcpu"]) == plain.mcpu


def in_new_thread(function):
    """Run `function` in a thread of its own (TVM keeps one thread pool per thread: the
    test's pool stays as it was)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(function()))
    thread.start()
    thread.join()
    return results[0]


def test_a_thread_setting_sizes_the_pool_and_stays_for_the_process(monkeypatch):
    """The one deliberate process-wide setting: TVM reads TVM_NUM_THREADS again after its
    pool is sized, so fmc leaves it set (fmc/runtime/threads.py)."""
    from fmc.runtime.threads import configure_threads, default_threads

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    # TVM sizes a new pool from the variable: 2 threads even where its own default is 1
    assert in_new_thread(lambda: configure_threads(2)) == 2
    assert os.environ["TVM_NUM_THREADS"] == "2" and default_threads() == 2
    assert in_new_thread(lambda: configure_threads(1)) == 1
    assert default_threads() == 1
