"""Host-side cost per step: the VM builtin calls a decode step makes beside its kernels
(view allocations, reshapes, kills) stay a small constant instead of growing with the layer
count, and removing them changes no result."""

from __future__ import annotations

import numpy as np

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.runtime.profile import profile_kernels

LAYERS = 8  # tests/models.py "llama-deep"
HOST_BUILTINS = ("vm.builtin.alloc_tensor", "vm.builtin.null_value", "vm.builtin.reshape")


def host_calls_per_decode_step(artifact) -> float:
    table = profile_kernels(fmc.load(artifact), prompt_len=8, decode_steps=4)["decode"]
    return sum(row["calls_per_step"] for row in table["kernels"]
               if row["kernel"] in HOST_BUILTINS)


def test_views_are_shared_and_parameter_kills_dropped(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama-deep"))
    shared, unshared = tmp_path / "shared", tmp_path / "unshared"
    compile_model(CompileOptions(model=model, output=shared, quant="q4f16"))
    compile_model(CompileOptions(model=model, output=unshared, quant="q4f16",
                                 disable_passes=["share-views", "drop-param-kills"]))
    with_passes, without = host_calls_per_decode_step(shared), host_calls_per_decode_step(
        unshared)
    # Without the passes: ~30 per layer (8 views, 2 reshapes, ~20 kills). With them the
    # distinct views of the plan, each created and killed once per step.
    assert without > 20 * LAYERS, without
    assert with_passes <= 40, with_passes
    ids = [3, 17, 42, 99, 5, 8]
    a, b = fmc.load(shared), fmc.load(unshared)
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    seq_a, seq_b = a.new_sequence(), b.new_sequence()
    a.prefill(seq_a, ids)
    b.prefill(seq_b, ids)
    for token in (7, 11, 13):
        np.testing.assert_array_equal(a.decode(seq_a, token), b.decode(seq_b, token))
