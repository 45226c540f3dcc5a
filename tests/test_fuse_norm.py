"""RMSNorm fusions: add→norm (default) and norm→GEMM (opt-in; with add→norm it is
GEMM→add→norm→GEMM). Before/after on a small module, then on a tiny model's logits."""

from __future__ import annotations

import numpy as np
import pytest

import fmc
from fmc.compiler import CompileOptions, build_ir, compile_model
from fmc.lowering.tir_util import block_names

HIDDEN, INNER = 64, 96


def residual_block_module():
    """One layer boundary as the model builds it: o_proj, residual add, norm, next GEMM."""
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 4, HIDDEN), "float32"), h: R.Tensor((1, 4, HIDDEN), "float32"),
                 w_o: R.Tensor((HIDDEN, HIDDEN), "float32"), g: R.Tensor((HIDDEN,), "float32"),
                 w_up: R.Tensor((INNER, HIDDEN), "float32")):
            with R.dataflow():
                o = R.matmul(x, R.permute_dims(w_o))
                residual = R.add(h, o)
                normed = R.nn.rms_norm(residual, g, axes=[-1], epsilon=1e-5)
                up = R.matmul(normed, R.permute_dims(w_up))
                out = (residual, up)
                R.output(out)
            return out

    return Module


def fused_kernels(*extra):
    """The module through fmc's fuse phase up to FuseTIR, then `extra` passes."""
    import tvm
    from tvm import relax

    passes = [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(),
              relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
              relax.transform.FuseTIR(), *extra, relax.transform.DeadCodeElimination(["main"])]
    return tvm.transform.Sequential(passes)(residual_block_module())


def kernels(mod) -> dict[str, list[str]]:
    from tvm import tirx

    return {gv.name_hint: block_names(f) for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc)}


def run(mod, inputs):
    """Schedule with the CPU matmul schedule (it must cope with merged kernels), build, run."""
    import tvm
    from tvm import relax

    from fmc.lowering.passes.schedule_cpu_matmul import ScheduleCPUMatmul
    from fmc.targets.cpu import HostCPU

    target = HostCPU().tvm_target()
    with target:
        mod = ScheduleCPUMatmul()(mod)
        executable = relax.build(mod, target=target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    residual, up = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return residual.numpy(), up.numpy()


def reference(x, h, w_o, g, w_up):
    residual = h + x @ w_o.T
    normed = residual / np.sqrt((residual**2).mean(-1, keepdims=True) + 1e-5) * g
    return residual, normed @ w_up.T


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    shapes = [(1, 4, HIDDEN), (1, 4, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN,), (INNER, HIDDEN)]
    return [rng.standard_normal(s).astype("float32") for s in shapes]


def test_add_norm_merges_the_residual_add_into_the_norm(inputs):
    from fmc.lowering.passes.fuse_norm import FuseAddNorm

    before, after = kernels(fused_kernels()), kernels(fused_kernels(FuseAddNorm()))
    assert len(after) == len(before) - 1
    merged = [blocks for blocks in after.values() if "T_add" in blocks and "T_rms_norm" in blocks]
    assert len(merged) == 1
    # The add is the o_proj matmul's epilogue, so the kernel is GEMM→add→norm.
    assert merged[0].index("NT_matmul") < merged[0].index("T_add") < \
        merged[0].index("T_rms_norm")
    merged_outputs = run(fused_kernels(FuseAddNorm()), inputs)
    for got, want in zip(merged_outputs, reference(*inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gemm_norm_gemm_is_one_kernel(inputs):
    from fmc.lowering.passes.fuse_norm import FuseAddNorm, FuseNormMatmul

    mod = fused_kernels(FuseNormMatmul(), FuseAddNorm())
    (blocks,) = [b for b in kernels(mod).values() if "T_rms_norm" in b]
    matmuls = [i for i, name in enumerate(blocks) if "matmul" in name]
    assert len(matmuls) == 2 and matmuls[0] < blocks.index("T_rms_norm") < matmuls[1]
    assert len(kernels(mod)) == 1
    for got, want in zip(run(mod, inputs), reference(*inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unfused_module_matches_reference_too(inputs):
    """Control: the comparison above is against numpy, not against the pass itself."""
    assert len(kernels(fused_kernels())) == 3
    for got, want in zip(run(fused_kernels(), inputs), reference(*inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def decode_launches(mod) -> int:
    from tests.test_fuse_horizontal import kernel_launches

    return kernel_launches(mod, "decode")


@pytest.mark.parametrize("quant", ["q0f32", "q4f16"])
def test_norm_fusions_keep_logits_and_cut_kernels(quant, tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama-quant"))
    # The float path: --cpu-dot int8's decode GEMVs are hand-scheduled loops that the norm
    # merges leave alone (docs/targets.md).
    variants = {"default": dict(cpu_dot="float"),
                "no-add-norm": dict(disable_passes=["fuse-add-norm"], cpu_dot="float"),
                "gemm-norm-gemm": dict(enable_passes=["fuse-norm-matmul"], cpu_dot="float")}
    logits, launches = {}, {}
    ids = [5, 9, 100, 3, 44, 150, 7]
    for name, extra in variants.items():
        compile_model(CompileOptions(model=model, output=tmp_path / name, quant=quant, **extra))
        logits[name] = fmc.load(tmp_path / name).logits(ids)
        launches[name] = decode_launches(build_ir(CompileOptions(model=model, quant=quant,
                                                                 **extra)).mod)
    reference_logits = logits["no-add-norm"]
    for name in ("default", "gemm-norm-gemm"):
        assert np.abs(logits[name] - reference_logits).max() <= \
            1e-5 * np.abs(reference_logits).max(), name
    layers = 2
    # add→norm: o_proj+add absorbs the post-attention norm, down+add the next layer's input
    # norm (the last layer's: the final norm): 2 kernels fewer per layer.
    assert launches["no-add-norm"] - launches["default"] == 2 * layers
    # norm→GEMM on top: each of those norms also takes its GEMM (gate/up, next qkv, lm_head),
    # and the first layer's input norm its qkv: 2 per layer + 1.
    assert launches["default"] - launches["gemm-norm-gemm"] == 2 * layers + 1
