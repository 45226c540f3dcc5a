"""Every fmc kernel of the tiny model's Vulkan build, run on Mesa's lavapipe, against the CPU
build of the same (unscheduled) kernel on random inputs — fp16 kernels included.

TVM's pre-scheduled paged-KV-cache kernels read page tables that random data would send out
of bounds; they are compiled and validated (test_target_vulkan.py, which also runs the decode
attention kernel with consistent page tables), not executed here (docs/targets.md)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from vulkan_runner import recording_launches

from fmc.compiler import CompileOptions, build_ir
from fmc.lowering import pipeline
from fmc.lowering.pipeline import PassSpec
from fmc.targets.vulkan import GLSLC

pytestmark = pytest.mark.skipif(GLSLC.path() is None, reason="needs glslc")


@pytest.fixture(scope="module", autouse=True)
def _launches_recorded():
    """Shaders built in this module carry their launch grid and buffer shapes (run alone)."""
    with recording_launches():
        yield


SHAPE_VALUES = 3  # every symbolic dimension (batch_size, seq_len, …)


def unscheduled_kernels(model: str, overrides: list[str] | None = None) -> dict:
    """The tiny model's kernels as the vulkan build has them just before GPU scheduling."""
    import tvm
    from tvm import tirx

    captured = {}

    @tvm.transform.module_pass(opt_level=0, name="Capture")
    class Capture:
        def transform_module(self, mod, _ctx):
            captured.update({gv.name_hint: f for gv, f in mod.functions_items()
                             if isinstance(f, tirx.PrimFunc)})
            return mod

    saved = list(pipeline.PIPELINE)
    try:
        pipeline.register_pass(PassSpec("capture", "lower", "test", lambda ctx: Capture()),
                               before="schedule")
        build_ir(CompileOptions(model=model, target="vulkan", quant="q4f16",
                                quant_overrides=overrides or []))
    finally:
        pipeline.PIPELINE[:] = saved
    return captured


def runnable(func) -> bool:
    """Kernels taking buffers only, not pre-scheduled. TVM's KV-cache kernels (attention,
    RoPE, page copies) come pre-scheduled or take scalars and read page tables that random
    data would send out of bounds."""
    if int((func.attrs or {}).get("tirx.is_scheduled", 0)):
        return False
    return bool(func.params) and all(hasattr(p.ty, "shape") for p in func.params)


def random_arrays(func, env, rng, float_scale: float = 1.0) -> dict[str, np.ndarray]:
    from vulkan_runner import evaluate

    arrays = {}
    for param in func.params:
        shape = [evaluate(d, env) for d in param.ty.shape]
        dtype = str(param.ty.dtype)
        if dtype == "uint16":  # bfloat16 weight bits (q0bf16): finite values only
            values = rng.standard_normal(shape).astype(np.float32)
            arrays[param.name] = (values.view(np.uint32) >> 16).astype(np.uint16)
        elif dtype.startswith("float"):
            arrays[param.name] = (float_scale * rng.standard_normal(shape)).astype(dtype)
        elif dtype in ("int32", "int64"):  # positions and gather indices: keep them in range
            arrays[param.name] = rng.integers(0, SHAPE_VALUES, shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arrays[param.name] = rng.integers(info.min, info.max, shape, dtype=dtype,
                                              endpoint=True)
    return arrays


def symbolic_dims(func) -> dict[str, int]:
    names = {}
    for param in func.params:
        for dim in param.ty.shape:
            if type(dim).__name__ in ("Var", "SizeVar"):
                names[dim.name] = SHAPE_VALUES
    return names


def run_on_cpu(name, func, arrays):
    import tvm

    from fmc.targets.cpu import HostCPU

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=HostCPU().tvm_target())
    tensors = [tvm.runtime.tensor(arrays[p.name]) for p in func.params]
    lib["main"](*tensors)
    return {p.name: t.numpy() for p, t in zip(func.params, tensors, strict=True)}


def vulkan_shaders(name, func):
    """Schedule and build the kernel for Vulkan through fmc's route; name → Shader/Kernel."""
    import tvm

    from fmc.targets import get

    target = get("vulkan")
    tvm_target = target.tvm_target()
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    with target.codegen_hooks(), tvm_target:
        for _, _, schedule in target.schedule_passes():
            mod = schedule(mod)
        tvm.compile(mod, target=tvm_target)
    spirv = {k.name: k.spirv for k in target.kernels}
    return {n: (shader, spirv[n]) for n, shader in target.shaders.items()}


@pytest.fixture(scope="module")
def kernels(tiny_checkpoint):
    return unscheduled_kernels(str(tiny_checkpoint("llama-quant")))


@pytest.fixture(scope="module")
def device():
    from vulkan_runner import VulkanDevice

    device = VulkanDevice()
    yield device
    device.close()


def relative_errors(name, func, device, rng, perturb: str | None = None,
                    float_scale: float = 1.0) -> dict[str, float]:
    """Max |vulkan - cpu| / max(1, max |cpu|) per buffer of one kernel (optionally with one
    input changed for the Vulkan run only: a negative control)."""
    from vulkan_runner import run_shader

    env = symbolic_dims(func)
    arrays = random_arrays(func, env, rng, float_scale)
    expected = run_on_cpu(name, func, arrays)
    if perturb is not None:
        arrays = {**arrays, perturb: arrays[perturb] + np.ones_like(arrays[perturb])}
    shaders = vulkan_shaders(name, func)
    assert len(shaders) == 1, (name, list(shaders))
    (shader, spirv), = shaders.values()
    results = run_shader(device, shader, spirv, arrays, env)
    errors = {}
    for buffer_name, got in results.items():
        want = expected[buffer_name].astype(np.float64)
        errors[buffer_name] = float(np.abs(got.astype(np.float64) - want).max()) / \
            max(1.0, float(np.abs(want).max()))
    return errors


def tolerance(func) -> float:
    """fp16 kernels compute (and dlight's GEMVs accumulate) in fp16, in another order than
    the CPU build: 1 % of the output's range; float32 kernels: 1e-5."""
    dtypes = {str(p.ty.dtype) for p in func.params}
    return 1e-2 if "float16" in dtypes else 1e-5


def test_every_runnable_kernel_matches_the_cpu_build(kernels, device):
    rng = np.random.default_rng(0)
    checked, skipped, failures = [], [], []
    for name, func in sorted(kernels.items()):
        if not runnable(func):
            skipped.append(name)
            continue
        for buffer_name, error in relative_errors(name, func, device, rng).items():
            if not error <= tolerance(func):
                failures.append(f"{name}/{buffer_name}: {error:.2e}")
        checked.append(name)
    assert failures == []
    # The model's own kernels all run: norms, every fused dequantize→GEMV/GEMM, SiLU·mul,
    # RoPE, reshapes, gathers; only TVM's (pre-scheduled) KV-cache kernels are skipped.
    assert len(checked) >= 30, checked
    kv_cache_kernels = ("batch_", "tree_attn", "tir_", "compact_kv", "copy_single_page",
                        "fused_rope")
    assert all(n.startswith(kv_cache_kernels) for n in skipped), skipped


def test_every_schemes_kernels_match_the_cpu_build(tiny_checkpoint, device):
    """The fused dequantize→GEMV/GEMM kernels of every built-in scheme (one weight matrix
    each in the tiny K-quant model) run on lavapipe like the CPU build."""
    from models import EVERY_SCHEME, EVERY_SCHEME_OVERRIDES

    kernels = unscheduled_kernels(str(tiny_checkpoint("llama-kquant")), EVERY_SCHEME_OVERRIDES)
    rng = np.random.default_rng(0)
    checked, failures = set(), []
    for name, func in sorted(kernels.items()):
        # kernel names: "[fused_]dequantize_SCHEME[N][_…]" (N: TVM's de-duplication)
        scheme = next((s for s in sorted(set(EVERY_SCHEME.values()), key=len, reverse=True)
                       if re.search(rf"dequantize_{s}\d*(_NT|_fused|$)", name)), None)
        if scheme is None or not runnable(func):
            continue
        # Small inputs: K-quant sub-scales (up to 63) times random float16 super-scales
        # would overflow the float16 GEMV otherwise.
        for buffer_name, error in relative_errors(name, func, device, rng,
                                                  float_scale=1 / 64).items():
            if not error <= tolerance(func):
                failures.append(f"{name}/{buffer_name}: {error:.2e}")
        checked.add(scheme)
    assert failures == []
    # q0f16 is the compute dtype on Vulkan: a plain matmul, no dequantize
    assert checked == set(EVERY_SCHEME.values()) - {"q0f16"}


def test_the_comparison_catches_a_wrong_result(kernels, device):
    """Negative control: feeding the Vulkan kernel a different input must show up."""
    name = next(n for n in sorted(kernels) if n.startswith("rms_norm") and runnable(kernels[n]))
    func = kernels[name]
    first_input = func.params[0].name
    errors = relative_errors(name, func, device, np.random.default_rng(1), perturb=first_input)
    assert max(errors.values()) > tolerance(func)
