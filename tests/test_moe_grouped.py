"""The grouped-expert GEMM of prompt tokens (fmc/nn_moe.py: counting sort by expert, blocks
of GROUP_ROWS rows of one expert, the CPU schedules that share each decoded weight across a
block's rows), compiled alone through fmc's CPU pipeline, against numpy — with routings
that stress the sort: every pair to one expert (many blocks), experts left unused,
block-sized and odd counts. Weights in float, in q4f16 row-major, and in q4f16 stored
row-interleaved as the CPU target stores them (`q4f16_rows16`: the row-lane schedule)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fmc.nn_moe import (
    EMPTY_BLOCK,
    GROUP_ROWS,
    ExpertLinear,
    gather_rows,
    group_by_expert,
    scatter_rows,
)
from fmc.quant import get
from fmc.quant.modules import QuantizedExpertLinear

EXPERTS, TOP_K, K, N = 6, 2, 64, 48


def build(scheme_name: str, dot: str = "float"):
    """A VM with `grouped(x, chosen)` over one stacked expert projection [EXPERTS, N, K] in
    `scheme_name` (q0f32: plain float weights), under `--cpu-dot dot`; the kernels by
    name."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    from fmc.lowering.pipeline import IRDumper, PassContext, run_phase
    from fmc.targets import get as get_target

    target = get_target("cpu")
    target.configure_dot(dot)

    class Model(nn.Module):
        def __init__(self):
            linear = ExpertLinear(EXPERTS, K, N, "float32")
            scheme = get(scheme_name)
            self.proj = linear if scheme.is_identity("float32") else \
                QuantizedExpertLinear(linear, scheme, "proj", "float32")

        def grouped(self, x: nn.Tensor, chosen: nn.Tensor):
            order = group_by_expert(chosen, EXPERTS)
            rows = gather_rows(x, order, TOP_K)
            return scatter_rows(self.proj.grouped(rows, order.block_expert), order, TOP_K)

    model = Model()
    spec = {"grouped": {"x": nn.spec.Tensor(["n", K], "float32"),
                        "chosen": nn.spec.Tensor(["n", TOP_K], "int32"),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    mod, _ = model.export_tvm(spec=nn.spec.ModuleSpec.from_raw(spec, model))
    ctx = PassContext(target, "float32", entry_functions=("grouped",))
    for phase in ("fuse", "lower"):
        mod = run_phase(phase, mod, ctx, target.default_disabled_passes(), IRDumper(None))
    kernels = {gv.name_hint: func for gv, func in mod.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc)}
    with target.codegen_hooks(), target.tvm_target():
        executable = relax.build(mod, target=target.tvm_target(), relax_pipeline=None,
                                 **target.build_options())
    return relax.VirtualMachine(executable, tvm.cpu()), kernels


@pytest.fixture(scope="module", params=["q0f32", "q4f16", "q4f16_rows16", "q4f16_rows16:int8"])
def compiled(request):
    """(scheme, dot, vm, kernels). int8: the integer-dot kernel (where the CPU has VNNI)."""
    from fmc.targets import get as get_target

    scheme_name, _, dot = request.param.partition(":")
    if dot == "int8" and not get_target("cpu").has_vnni():
        pytest.skip("this CPU cannot run VNNI code (tests/test_cpu_int8_dot.py checks the "
                    "kernel's assembly)")
    return scheme_name, dot or "float", *build(scheme_name, dot or "float")


ROUTINGS = {
    # 19 tokens, both slots to expert 0 or 3: expert 0 fills several blocks, 1, 2, 4, 5 none
    "skewed": lambda rng, n: np.stack([np.zeros(n), np.full(n, 3)], axis=1),
    # exactly one block's worth per expert used
    "block-sized": lambda rng, n: np.stack([np.arange(n) % 2, 2 + np.arange(n) % 2], axis=1),
    "random": lambda rng, n: np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(n)]),
}
TOKENS = {"skewed": 19, "block-sized": GROUP_ROWS, "random": 23}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_grouped_equals_numpy(compiled, routing):
    import tvm

    scheme_name, dot, vm, _ = compiled
    scheme = get(scheme_name)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((EXPERTS, N, K)).astype(np.float32)
    if scheme.is_identity("float32"):
        stored, dense = [weight], weight
    else:
        from fmc.quant import experts

        parts = scheme.quantize(experts.flatten(weight))
        stored = experts.split(parts, EXPERTS)
        dense = experts.dequantize(scheme, stored)
    n = TOKENS[routing]
    x = rng.standard_normal((n, K)).astype(np.float32)
    chosen = ROUTINGS[routing](rng, n).astype(np.int32)
    params = [tvm.runtime.tensor(a, tvm.cpu()) for a in stored]
    device = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, chosen)]
    grouped = vm["grouped"](*device, params).numpy()
    assert grouped.shape == (n, TOP_K, N)
    if dot == "int8":  # int8 activations: the integer model of each (token, slot)
        from test_cpu_int8_dot import group_operands, integer_model

        base = scheme_name.partition("_rows")[0]
        operands = [group_operands(base, weight[e]) for e in range(EXPERTS)]
        expected = np.array([[integer_model(*operands[e], x[t]) for e in chosen[t]]
                             for t in range(n)])
        np.testing.assert_allclose(grouped, expected, rtol=2e-6,
                                   atol=2e-6 * np.abs(expected).max())
        return
    expected = np.einsum("tjoi,ti->tjo", dense[chosen], x)
    np.testing.assert_allclose(grouped, expected, rtol=1e-5, atol=1e-4)


def test_the_grouped_kernel_shares_each_decoded_weight_across_a_blocks_rows(compiled):
    """The CPU schedule's form. Row-major weights: parallel over (block, output), the block's
    rows unrolled inside each SIMD chunk of the reduction. Row-interleaved weights: parallel
    over (block, output tile), a lane per weight row, the codes of a stored word unrolled
    and the block's rows looping inside the word (its decoded weights loop-invariant)."""
    scheme_name, dot, _, kernels = compiled
    grouped = [func for name, func in kernels.items() if name.startswith("moe_grouped")
               and "gather" not in name and "scatter" not in name and "position" not in name
               and "source" not in name]
    assert len(grouped) == 1
    script = grouped[0].script()
    assert "T.parallel" in script
    if dot == "int8":  # hand-written: vpdpbusd over the block's expert, empty blocks skipped
        assert "llvm.x86.avx512.vpdpbusd.512" in script
        assert f"!= {EMPTY_BLOCK}" in script
        return
    assert "T.vectorized(T.int64(16))" in script
    if scheme_name.endswith("_rows16"):
        assert "T.unroll(T.int64(8))" in script  # the 8 codes of a 32-bit word
        # the rows inside the word loop: `for k_0, r in T.grid(words, GROUP_ROWS)`
        assert re.search(rf"for k_0, r in T\.grid\(T\.int64\(\d+\), T\.int64\({GROUP_ROWS}\)\)",
                         script)
    else:
        assert f"T.unroll(T.int64({GROUP_ROWS}))" in script
