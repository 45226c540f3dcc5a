"""The contracts between the compile phases (fmc/products.py) and with the IR passes: passes
get a frozen PassContext and change only the module; the stored-parameter plan travels on
the module and the compiler reads it back; the cached products round-trip whole."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fmc.compiler import CompileOptions, build_ir
from fmc.lowering import PassContext, PassSpec, param_plan, pipeline, register_pass
from fmc.products import ConvertedWeights, Library
from fmc.targets import get as get_target


def test_a_pass_context_cannot_be_changed():
    ctx = PassContext(get_target("cpu"), "float32", ("decode",), ("k=f.py",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.compute_dtype = "float16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.params = []  # the plan is not the context's: it travels on the module


def test_fusion_leaves_its_plan_on_the_module_and_the_compiler_reads_it_back(
        tiny_checkpoint, monkeypatch):
    import tvm

    seen = {}

    @tvm.transform.module_pass(opt_level=0, name="DropModuleAttrs")
    def drop_attrs(mod, _ctx):
        """Like a TVM pass that rebuilds the module without its attributes."""
        seen["plan"] = param_plan.read(mod)
        return mod.without_attr(param_plan.ATTR)

    monkeypatch.setattr(pipeline, "PIPELINE", list(pipeline.PIPELINE))
    register_pass(PassSpec("drop-module-attrs", "fuse", "test", lambda ctx: drop_attrs),
                  after="fuse-horizontal")
    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-mha"))))

    exported, fused = state.quantized.params, state.ir.params
    assert param_plan.read(state.quantized.mod) == exported
    assert not any(p.members for p in exported)
    # fuse-horizontal wrote its plan on the module: q/k/v and gate/up became one each
    assert seen["plan"] == fused
    assert len(fused) < len(exported) and any(p.members for p in fused)
    assert {m.name for p in fused for m in p.members} | {p.name for p in fused
                                                          if not p.members} \
        == {p.name for p in exported}
    assert param_plan.read(state.ir.mod) is None  # read back, then not carried into codegen
    assert state.params == fused

    # What the build cache stores of the library step is that product, whole.
    library = Library("model.so", fused, state.quantized.entry_functions, {"checked": 1})
    assert Library.from_dict(json.loads(json.dumps(library.to_dict()))) == library
    weights = ConvertedWeights(({"name": "w", "shard": "params/shard-00000.safetensors"},),
                               ({"file": "params/shard-00000.safetensors"},), {"tokens": 3})
    assert ConvertedWeights.from_dict(json.loads(json.dumps(weights.to_dict()))) == weights
