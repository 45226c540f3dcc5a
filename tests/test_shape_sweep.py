"""Shape sweep (issue #20): valid model shapes through a weights-free compile that runs
codegen, on every target. A shape fmc can store compiles; one it cannot (a group size that
does not divide a reduction dimension, ranks that do not divide the heads) is refused with a
documented error; an internal error or a code generator failure (exit 8) fails the test.

The cases and the compile are benchmarks/shape_sweep.py's; CI runs part of its table of
known-hard cases and a few derandomized hypothesis examples per target (one-layer models;
CUDA builds one architecture, sm_80: the multi-architecture fatbin has its own tests). The
long run is `python benchmarks/shape_sweep.py --sweep` (results in docs/targets.md)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from shape_sweep import HARD, HEAD_DIMS, QUANTS, Case, compile_case, fits, group_size  # noqa: E402

# Refusals the sweep may meet, with their exit codes (docs/errors.md): a group size that
# does not divide a reduction dimension (4); ranks that do not divide heads or MLP (2).
REFUSALS = {4: "is not a multiple of", 2: "does not divide"}

# Hard cases CI compiles (the rest run in the long sweep): by `why`'s first words.
CI_HARD = ("head_dim 80", "largest head_dim: attention", "largest head_dim on Metal",
           "one KV head per rank after --tensor-parallel 4", "hidden 200")

# hypothesis examples per target: what fits in CI's few minutes on 2 cores (measured: one
# compile takes ~3-6 s on cpu, ~10 s metal, ~14 s vulkan, ~19 s cuda:sm_80 after a first
# CUDA compile's ~45 s of one-time setup).
EXAMPLES = {"cpu": 4, "cpu:aarch64-linux": 2, "metal": 1, "vulkan": 1, "cuda:sm_80": 1}


def check(case: Case) -> None:
    result = compile_case(case)
    assert result["status"] != "failed", f"{case.label()}: {result['message']}"
    assert not result["left_behind"], result
    if fits(case):
        assert result["status"] == "ok", f"{case.label()} was refused: {result['message']}"
    else:
        assert result["status"] == "refused" and result["exit"] in REFUSALS, result
        assert REFUSALS[result["exit"]] in result["message"], result


@pytest.mark.parametrize("case", [c for c in HARD if c.why.startswith(CI_HARD)],
                         ids=lambda c: f"{c.target}-{c.why.split(':')[0].split(' (')[0]}")
def test_known_hard_shapes(case):
    check(case)


def test_the_hard_table_covers_the_issue():
    """Every target, head_dim extremes, odd groups, one KV head per rank, a refusal."""
    assert {c.target.split(":")[0] for c in HARD} >= {"cpu", "cuda", "metal", "vulkan"}
    assert "cpu:aarch64-linux" in {c.target for c in HARD}
    assert {c.head_dim for c in HARD} >= {32, 80, 256}
    assert {c.group for c in HARD} >= {3, 5, 7}
    assert any(c.kv_heads == c.tp > 1 for c in HARD)
    assert any(not fits(c) for c in HARD) and all(fits(c) for c in HARD if "refusal" not in c.why)


@st.composite
def cases(draw, target: str) -> Case:
    quant = draw(st.sampled_from(QUANTS))
    g = max(32, group_size(quant))  # the K-quants fall back to q5_0's 32 where 256 fails
    tp = draw(st.sampled_from((1, 2, 3, 4)))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    group = draw(st.integers(1, 8))
    kv_heads = tp * draw(st.integers(1, 2))
    hidden = g * draw(st.sampled_from((1, 3, 5, 7)))  # not multiples of 64 (but for nf4)
    if group_size(quant) == 256:
        hidden = draw(st.sampled_from((256, 768, 96)))
    case = Case(head_dim=head_dim, group=group, kv_heads=kv_heads, hidden=hidden,
                intermediate=tp * g * draw(st.sampled_from((1, 3, 5))),
                vocab=draw(st.sampled_from((97, 151, 1001, 32001))), tied=draw(st.booleans()),
                qwen2=draw(st.booleans()), quant=quant, tp=tp, target=target)
    if not fits(case):  # mostly shapes that must compile; the rest must be refused
        case = replace(case, head_dim=64) if draw(st.integers(0, 9)) else case
    return case


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_random_shapes(target):
    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate),  # no shrinking: compiles are slow
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases(target))
    def sweep(case):
        check(case)

    sweep()
