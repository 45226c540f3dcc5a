"""fmc's Vulkan runtime plugin (fmc/devices/vulkan_runtime.py, native/fmc_vulkan_runtime.cc)
running whole Vulkan artifacts on Mesa's lavapipe, against the CPU artifact of the same
model and scheme: logits within a stated bound, greedy tokens equal, and every KV-cache
operation the engine has (prefill, decode, fork, pop, batched decode, save/restore).

Skipped only when this machine has no Vulkan loader or driver; CI installs both
(scripts/test.sh), so there it runs."""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import fmc
from fmc.devices.vulkan_runtime import VULKAN_LOADER, list_devices

LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
# lavapipe, whatever GPU the machine has: the bounds below were measured on it. Set before
# anything in this process creates a Vulkan instance.
if "VK_ICD_FILENAMES" not in os.environ and LAVAPIPE_ICD.exists():
    os.environ["VK_ICD_FILENAMES"] = str(LAVAPIPE_ICD)


def why_no_vulkan() -> str | None:
    try:
        ctypes.CDLL(VULKAN_LOADER)
    except OSError:
        return f"no Vulkan loader ({VULKAN_LOADER}): apt-get install libvulkan1"
    if not list_devices():
        return "no Vulkan driver: apt-get install mesa-vulkan-drivers"
    return None


pytestmark = pytest.mark.skipif(why_no_vulkan() is not None, reason=str(why_no_vulkan()))

MODEL = "llama-quant"
# Worst |vulkan − cpu| over a step's logits, relative to that step's max |cpu logit|. fp32
# is the runtime itself (copies, offsets, launch ABI): it must agree to rounding. The fp16
# schemes differ by the order and precision of accumulation (dlight's GPU GEMVs accumulate
# in fp16; the CPU build in fp32). Measured on this model: q0f32 8.5e-7, q0f16 5.7e-3,
# q4f16 5.3e-3 (docs/targets.md, Vulkan).
TOLERANCE = {"q0f32": 1e-5, "q0f16": 1.5e-2, "q4f16": 1.5e-2}
PROMPT = [5, 17, 33, 2, 99, 140, 7, 61, 12, 88, 3, 45]


def scenario(engine, tmp: Path) -> dict:
    """Every KV-cache operation once; the logits after each, and the greedy tokens."""
    out: dict = {"logits": engine.logits(PROMPT)}
    a = engine.new_sequence()
    out["prefill"] = logits = engine.prefill(a, PROMPT)
    greedy = []
    for step in range(6):
        greedy.append(int(np.argmax(logits)))
        out[f"decode {step}"] = logits = engine.decode(a, greedy[-1])
    out["greedy"] = greedy
    b = engine.fork(a, at=8)
    out["prefill after fork"] = engine.prefill(b, [9, 10, 11])
    engine.pop(a, 3)
    out["decode after pop"] = engine.decode(a, 42)
    out["batched decode"] = engine.decode_batch([a, b], [1, 2])
    engine.save(a, tmp / "a.session")
    engine.remove(a)
    engine.remove(b)
    c, _ = engine.restore(tmp / "a.session")
    out["restored by"] = engine.last_import  # "copied": pages went device→host→device
    out["decode after restore"] = engine.decode(c, 7)
    return out


@pytest.fixture(scope="module")
def runs(tiny_artifact, tmp_path_factory):
    """quant → (cpu outputs, vulkan outputs, vulkan seconds), run once each."""
    done: dict = {}

    def get(quant: str):
        if quant not in done:
            cpu = scenario(fmc.load(tiny_artifact(MODEL, quant)), tmp_path_factory.mktemp("c"))
            engine = fmc.load(tiny_artifact(MODEL, quant, "vulkan"))
            start = time.perf_counter()
            vulkan = scenario(engine, tmp_path_factory.mktemp("v"))
            done[quant] = cpu, vulkan, time.perf_counter() - start
        return done[quant]

    return get


def relative_error(cpu: np.ndarray, vulkan: np.ndarray) -> float:
    cpu, vulkan = np.atleast_2d(cpu), np.atleast_2d(vulkan)
    return float((np.abs(vulkan - cpu).max(axis=-1) / np.abs(cpu).max(axis=-1)).max())


@pytest.mark.parametrize("quant", ["q4f16", "q0f16", "q0f32"])
def test_whole_model_on_lavapipe_matches_the_cpu_artifact(runs, quant):
    cpu, vulkan, seconds = runs(quant)
    assert vulkan["greedy"] == cpu["greedy"]
    assert vulkan["restored by"] == cpu["restored by"] == "copied"
    errors = {stage: relative_error(cpu[stage], vulkan[stage]) for stage in cpu
              if stage not in ("greedy", "restored by")}
    print(f"{quant}: {seconds:.2f} s on lavapipe; worst relative error "
          f"{max(errors.values()):.1e}")
    assert all(np.isfinite(list(errors.values())))
    bad = {stage: error for stage, error in errors.items() if error > TOLERANCE[quant]}
    assert not bad, f"{quant}: over {TOLERANCE[quant]}: {bad}"


def test_fmc_run_on_a_vulkan_artifact_prints_what_the_cpu_artifact_prints(tiny_artifact,
                                                                          capsys):
    from fmc.cli import main

    outputs = []
    for target in ("cpu", "vulkan"):
        artifact = tiny_artifact(MODEL, "q0f32", target)
        assert main(["--quiet", "run", str(artifact), "--prompt", "w5 w6 w7",
                     "--max-tokens", "8", "--ignore-eos", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        outputs.append((result["token_ids"], result["text"]))
    assert outputs[0] == outputs[1] and len(outputs[0][0]) == 8


@pytest.fixture(scope="module")
def vulkan_module(tiny_artifact):
    """The loaded library's Vulkan module (one function per kernel) and its kernels."""
    import tvm

    from fmc.devices.vulkan_runtime import ensure_vulkan_runtime
    from fmc.targets.vulkan_module import find_vulkan_module

    ensure_vulkan_runtime()
    library = tvm.runtime.load_module(str(tiny_artifact(MODEL, "q4f16", "vulkan") /
                                          "model.so"))
    (module,) = [m for m in library.imports[0].imports if m.kind == "vulkan"]
    kernels = {k.name: k for k in find_vulkan_module(
        (tiny_artifact(MODEL, "q4f16", "vulkan") / "model.so").read_bytes())}
    return module, kernels


def test_kernel_launch_errors_fail_loudly(vulkan_module):
    import tvm

    module, kernels = vulkan_module
    kernel = kernels["rms_norm_kernel"]
    buffers = sum(t == "handle" for t in kernel.arg_types)
    device = tvm.vulkan(0)
    tensors = [tvm.runtime.empty((64,), "float16", device) for _ in range(buffers)]
    function = module[kernel.name]
    with pytest.raises(TypeError, match=rf"rms_norm_kernel: expects "
                       rf"{len(kernel.arg_types) + len(kernel.launch_params)} arguments "
                       rf"\({buffers} buffers"):
        function(*tensors[:-1])  # one buffer short
    scalars = [1] * (len(kernel.arg_types) - buffers) + [1] * len(kernel.launch_params)
    host = tvm.runtime.empty((64,), "float16", tvm.cpu())
    with pytest.raises(ValueError, match="argument 0 is not a Vulkan tensor"):
        function(host, *tensors[1:], *scalars)
    with pytest.raises(ValueError, match="argument 1 is not a live Vulkan buffer"):
        function(tensors[0], ctypes.c_void_p(0xDEAD0), *tensors[2:], *scalars)


def test_device_api_copies_and_attributes():
    import tvm

    device = tvm.vulkan(0)
    assert device.exist and "llvmpipe" in device.device_name
    assert device.max_threads_per_block >= 256 and device.warp_size == 1
    assert device.max_shared_memory_per_block >= 16384
    assert device.compute_version.startswith("1.")
    rng = np.random.default_rng(0)
    big = rng.standard_normal(5_000_000).astype(np.float32)  # 20 MB: staged in pieces
    on_device = tvm.runtime.tensor(big, device)
    copy = tvm.runtime.empty(big.shape, "float32", device)
    copy.copyfrom(on_device)  # device → device
    assert np.array_equal(copy.numpy(), big)
    assert not tvm.vulkan(7).exist


def test_doctor_and_targets_report_the_vulkan_runtime(capsys):
    from fmc.cli import main

    assert main(["doctor", "--json"]) == 0
    runtime = json.loads(capsys.readouterr().out)["targets"]["vulkan"]["runtime"]
    assert runtime["loader"] and runtime["devices"] and runtime["ready"]
    assert runtime["plugin"] in ("built", "buildable")
    assert main(["targets", "--json"]) == 0
    (vulkan,) = [t for t in json.loads(capsys.readouterr().out) if t["name"] == "vulkan"]
    assert vulkan["runtime"]["ready"]


@pytest.mark.slow
def test_smollm2_on_lavapipe_matches_the_cpu_artifact(smollm2_default_artifact):
    """SmolLM2-135M's default compile (Q4_1 and Q8_0 blocks kept): prefill of a 6-token
    prompt and 8 greedy decode steps, against the CPU artifact (≈45 s, most of it the
    Vulkan compile and lavapipe's ≈1.5 s per step)."""
    results = []
    for target in ("cpu", "vulkan"):
        engine = fmc.load(smollm2_default_artifact(target))
        seq = engine.new_sequence()
        logits = [engine.prefill(seq, engine.tokenizer.encode("The capital of France is"))]
        tokens = []
        for _ in range(8):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(engine.decode(seq, tokens[-1]))
        results.append((np.array(logits), tokens))
    (cpu, cpu_tokens), (vulkan, vulkan_tokens) = results
    assert vulkan_tokens == cpu_tokens
    error = relative_error(cpu, vulkan)
    print(f"SmolLM2 on lavapipe: worst relative error {error:.1e}")
    assert error <= 4e-2  # measured 1.7e-2 (fp16 activations, fp16 GEMV accumulation)
