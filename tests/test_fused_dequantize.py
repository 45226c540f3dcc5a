"""No kernel of a quantized model materialises a dequantized weight: the dequantize is fused
into the consuming matmul and decoded in registers (checked on the lowered IR)."""

from __future__ import annotations

import pytest

from fmc.compiler import CompileOptions, build_ir
from fmc.frontend import open_model

FLOAT_TYPES = {"float16", "float32", "bfloat16"}


def full_weight_buffers(mod, weight_shapes: set[tuple[int, ...]]) -> list[str]:
    """Kernels with a float buffer (parameter or allocation) shaped like a whole weight."""
    from tvm import tirx

    found = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        # Parameters are typed as buffers in 0.27; allocations live in the root block.
        buffers = [(p.name, p.ty) for p in func.params if hasattr(p.ty, "shape")]
        root = getattr(func.body, "block", None)  # host-side helpers have no root block
        buffers += [(b.name, b) for b in (root.alloc_buffers if root is not None else [])]
        for name, buffer in buffers:
            shape = tuple(int(d) if isinstance(d, tirx.IntImm) else None for d in buffer.shape)
            if str(buffer.dtype) in FLOAT_TYPES and shape in weight_shapes:
                found.append(f"{gv.name_hint}:{name}{list(shape)}")
    return found


def quantized_weight_shapes(state) -> set[tuple[int, ...]]:
    index = state.source.weights.index()
    return {tuple(index[p.source].shape) for p in state.params if p.scheme}


@pytest.mark.parametrize("quant", ["q4f16", "q8f16", "nf4", "q4_0"])
def test_no_kernel_holds_a_dequantized_weight(quant, tiny_checkpoint):
    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-quant")), quant=quant))
    shapes = quantized_weight_shapes(state)
    assert (160, 64) in shapes and (64, 128) in shapes  # embedding/lm_head and down_proj
    assert full_weight_buffers(state.mod, shapes) == []
    decode = state.mod["decode"].script()
    assert "fused_dequantize" in decode


def test_check_detects_an_unfused_dequantize(tiny_checkpoint):
    """Negative control: without the fusion passes, the check above must fire."""
    state = build_ir(CompileOptions(
        model=str(tiny_checkpoint("llama-quant")), quant="q4f16",
        disable_passes=["fuse-dequantize-matmul", "inline-dequantize"]))
    found = full_weight_buffers(state.mod, quantized_weight_shapes(state))
    assert any(name.startswith("dequantize_q4f16") for name in found), found


def test_weights_free_build_ir_needs_no_weights():
    state = build_ir(CompileOptions(model="smollm2-135m", quant="q4f16"))
    assert state.source.weights is None and open_model("smollm2-135m").weights is None
    assert "decode" in [gv.name_hint for gv in state.mod.get_global_vars()]
