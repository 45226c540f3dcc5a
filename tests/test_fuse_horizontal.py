"""Horizontal fusion: q/k/v and gate/up become one matmul over concatenated weights."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

import fmc
from fmc.artifacts.safetensors_reader import SafetensorsFile
from fmc.compiler import CompileOptions, build_ir, compile_model


def kernel_launches(mod, entry: str) -> int:
    """Kernel calls in an entry function of the lowered module."""
    from tvm import tirx

    script = mod[entry].script()
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return sum(len(re.findall(rf"\b{re.escape(n)}\(", script)) for n in names)


@pytest.mark.parametrize("name, quant", [("qwen2-bias", "q0f32"), ("llama-quant", "q4f16"),
                                         ("llama-gqa-untied", "q8f16")])
def test_fusion_keeps_logits_and_cuts_kernels(name, quant, tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint(name))
    on, off = tmp_path / "on", tmp_path / "off"
    compile_model(CompileOptions(model=model, output=on, quant=quant))
    compile_model(CompileOptions(model=model, output=off, quant=quant,
                                 disable_passes=["fuse-horizontal"]))
    ids = [5, 9, 100, 3, 44, 150, 7]
    a, b = fmc.load(on).logits(ids), fmc.load(off).logits(ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    with_fusion = build_ir(CompileOptions(model=model, quant=quant)).mod
    without = build_ir(CompileOptions(model=model, quant=quant,
                                      disable_passes=["fuse-horizontal"])).mod
    # Per layer, unfused: q, k, v matmuls + their concat (4) and up + gate·SiLU·up (2).
    # Fused: one qkv matmul, whose split→concat simplify-copies removes (1), and one
    # gate/up matmul + split·SiLU·mul (2): 3 fewer kernels per layer.
    layers = 2
    assert kernel_launches(without, "decode") - kernel_launches(with_fusion, "decode") \
        == 3 * layers


def test_manifest_maps_fused_tensors_to_checkpoint_rows(tiny_checkpoint, tiny_artifact):
    checkpoint = load_file(str(tiny_checkpoint("qwen2-bias") / "model.safetensors"))
    artifact = tiny_artifact("qwen2-bias")
    manifest = json.loads((artifact / "manifest.json").read_text())
    fused = [p for p in manifest["params"] if p.get("fused_from")]
    names = {p["name"] for p in fused}
    assert {"model.layers.0.self_attn.q_proj+k_proj+v_proj.weight",
            "model.layers.0.self_attn.q_proj+k_proj+v_proj.bias",
            "model.layers.1.mlp.gate_proj+up_proj.weight"} <= names
    covered = set()
    for entry in fused:
        array = SafetensorsFile(artifact / entry["shard"]).load(entry["name"])
        assert entry["source"] is None
        for member in entry["fused_from"]:
            start, end = member["rows"]
            np.testing.assert_array_equal(array[start:end], checkpoint[member["source"]])
            covered.add(member["source"])
    plain = {p["source"] for p in manifest["params"] if p["source"]}
    assert covered | plain == set(checkpoint)  # every checkpoint tensor accounted for


def test_simplify_copies_only_when_pieces_reassemble_in_order():
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from fmc.lowering.passes.simplify_copies import SimplifyCopies

    @tvm.script.ir_module
    class Module:
        @R.function
        def same(x: R.Tensor((2, 6), "float32")) -> R.Tensor((2, 6), "float32"):
            with R.dataflow():
                parts = R.split(x, indices_or_sections=[2, 3], axis=1)
                y = R.concat((parts[0], parts[1], parts[2]), axis=-1)
                R.output(y)
            return y

        @R.function
        def swapped(x: R.Tensor((2, 6), "float32")) -> R.Tensor((2, 6), "float32"):
            with R.dataflow():
                parts = R.split(x, indices_or_sections=[3], axis=1)
                y = R.concat((parts[1], parts[0]), axis=1)
                R.output(y)
            return y

    out = SimplifyCopies()(Module)
    assert "concat" not in out["same"].script() and "split" not in out["same"].script()
    assert "concat" in out["swapped"].script()
    assert isinstance(out["same"].body.body, relax.Var)


def test_unfusable_projections_are_left_alone(tiny_checkpoint):
    """o_proj and down_proj read distinct inputs: no group, no new parameters for them."""
    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-mha"))))
    names = [p.name for p in state.params]
    assert "model.layers.0.self_attn.o_proj.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert not any("o_proj+" in n or "down_proj+" in n for n in names)
