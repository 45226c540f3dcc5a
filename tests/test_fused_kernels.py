"""Each scheme's fused dequantize→matmul kernel, compiled alone through fmc's CPU pipeline,
equals numpy's dequantize(W) @ x — for a GEMV (one row) and a GEMM (several rows), in the
scheme's own layout and in the CPU's row-interleaved one."""

from __future__ import annotations

import numpy as np
import pytest

from fmc.quant import get
from fmc.quant.modules import QuantizedLinear

SCHEMES = ["q4f16", "q4f32", "q8f16", "q4_0", "q4_1", "q5_0", "q5_1", "nf4", "q4k", "q5k",
           "q6k", "q0f16", "q0bf16"]
K, N = 512, 48


def build_linear(scheme_name: str, target_name: str = "cpu", rows: int | str = "rows"):
    """One quantized linear layer (x [1, rows, K] · Wᵀ; rows symbolic, or 1 for a decode
    GEMV) through fmc's fuse and lower phases and relax.build for a target: (executable,
    parameter shapes, kernels)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    from fmc.lowering.pipeline import IRDumper, PassContext, run_phase
    from fmc.targets import get as get_target

    target = get_target(target_name)
    dtype = target.compute_dtype(get(scheme_name).compute_dtype)

    class Model(nn.Module):
        def __init__(self):
            self.proj = QuantizedLinear(nn.Linear(K, N, bias=False), get(scheme_name), "proj",
                                        dtype)

        def forward(self, x: nn.Tensor):
            return self.proj(x)

    model = Model()
    spec = {"forward": {"x": nn.spec.Tensor([1, rows, K], dtype),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    mod, params = model.export_tvm(spec=nn.spec.ModuleSpec.from_raw(spec, model))
    ctx = PassContext(target, dtype, entry_functions=("forward",))
    for phase in ("fuse", "lower"):
        mod = run_phase(phase, mod, ctx, target.default_disabled_passes(), IRDumper(None))
    kernels = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    with target.codegen_hooks(), target.tvm_target():
        executable = relax.build(mod, target=target.tvm_target(), relax_pipeline=None,
                                 **target.build_options())
    return executable, [p.shape for _, p in params], kernels


def compile_linear(scheme_name: str):
    """`build_linear` for the CPU, loaded into a VM."""
    import tvm
    from tvm import relax

    executable, shapes, kernels = build_linear(scheme_name)
    return relax.VirtualMachine(executable, tvm.cpu()), shapes, kernels


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("layout", ["", "_rows16"])
def test_fused_kernel_equals_numpy(scheme_name, layout):
    import tvm

    scheme = get(scheme_name + layout)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((N, K)).astype(np.float32)
    stored = scheme.quantize(weight)
    vm, shapes, kernels = compile_linear(scheme_name + layout)
    assert [list(s.shape) for s in stored] == [list(map(int, s)) for s in shapes]
    assert not any(k.startswith("dequantize") for k in kernels), kernels  # fused away
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in stored]
    for rows in (1, 5):  # decode's GEMV and prefill's GEMM
        x = rng.standard_normal((1, rows, K)).astype(np.float32)
        out = vm["forward"](tvm.runtime.tensor(x, tvm.cpu()), args).numpy()
        expected = x @ scheme.dequantize(stored).T
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
