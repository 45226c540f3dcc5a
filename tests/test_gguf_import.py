"""Lossless import of GGUF block types: every supported type's blocks are kept as they are
(fmc's dequantize equals gguf-py's bit for bit), `--quant gguf` keeps a whole file's types,
and a type fmc cannot keep is an error naming the tensor."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from models import random_blocks, write_gguf_from_checkpoint
from test_quant import IDS, dequantized_state, hf_logits_with

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError, UsageError
from fmc.frontend.gguf_file import hf_name, unpermute_rows
from fmc.quant import get

T = gguf.GGMLQuantizationType
# scheme → the GGUF type it keeps; gguf-py quantizes these itself.
QUANTIZABLE = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8f16": T.Q8_0,
               "q0bf16": T.BF16}
RANDOM = {"q4k": T.Q4_K, "q5k": T.Q5_K, "q6k": T.Q6_K}


def weight(rows=32, k=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(QUANTIZABLE))
def test_blocks_made_by_gguf_import_losslessly_and_fmc_quantizes_closer(name):
    scheme, qtype, w = get(name), QUANTIZABLE[name], weight()
    blocks = gguf.quants.quantize(w, qtype)
    theirs = gguf.quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(scheme.dequantize(scheme.from_gguf(qtype.name, blocks,
                                                                     w.shape)), theirs)
    ours = scheme.dequantize(scheme.quantize(w))
    assert ((ours - w) ** 2).sum() <= ((theirs - w) ** 2).sum()  # bf16: both round-to-even


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_k_quant_blocks_import_losslessly(name):
    """Random blocks (every packed sub-scale and code bit pattern occurs) decode exactly as
    gguf-py decodes them, through numpy and through the TE dequantize."""
    import tvm
    from tvm import te

    scheme, qtype = get(name), RANDOM[name]
    blocks = random_blocks(qtype, 32, 768, seed=3)
    stored = scheme.from_gguf(qtype.name, blocks, (32, 768))
    expected = gguf.quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(scheme.dequantize(stored), expected)
    placeholders = [te.placeholder(a.shape, str(a.dtype)) for a in stored]
    kernel = tvm.compile(te.create_prim_func(
        [*placeholders, scheme.dequantize_te(placeholders, "float32")]), "llvm")
    out = tvm.runtime.tensor(np.zeros((32, 768), np.float32))
    kernel(*[tvm.runtime.tensor(a) for a in stored], out)
    np.testing.assert_array_equal(out.numpy(), expected)


LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# One tensor of each supported type across the tiny model's weight matrices.
EVERY_TYPE = {"token_embd.weight": T.Q8_0, "output.weight": T.Q6_K,
              "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_1,
              "blk.0.attn_v.weight": T.Q5_0, "blk.0.attn_output.weight": T.Q5_1,
              "blk.0.ffn_gate.weight": T.Q4_K, "blk.0.ffn_up.weight": T.Q5_K,
              "blk.0.ffn_down.weight": T.Q6_K, "blk.1.attn_q.weight": T.F16,
              "blk.1.attn_k.weight": T.BF16, "blk.1.attn_v.weight": T.Q8_0,
              "blk.1.attn_output.weight": T.Q4_K, "blk.1.ffn_gate.weight": T.Q5_0,
              "blk.1.ffn_up.weight": T.Q4_1, "blk.1.ffn_down.weight": T.Q5_K}


def test_a_gguf_of_every_type_compiles_losslessly_by_default(tiny_checkpoint, tmp_path):
    """A GGUF input keeps its own types (the default for GGUF inputs, `--quant gguf`): each
    stored tensor dequantizes to gguf-py's values (Q/K rows unpermuted), and the compiled
    model equals transformers running those weights. blk.1.attn_q stays F32 (the writer's)."""
    checkpoint = tiny_checkpoint("llama-kquant")
    path = write_gguf_from_checkpoint(checkpoint, tmp_path / "every.gguf", EVERY_TYPE)
    out = tmp_path / "out"
    compile_model(CompileOptions(model=str(path), output=out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["default"] == "gguf"
    layers = manifest["quantization"]["layers"]
    assert layers["model.layers.0.mlp.gate_proj"] == "q4k"
    assert layers["lm_head"] == "q6k" and layers["model.embed_tokens"] == "q8f16"
    assert layers["model.layers.1.self_attn.k_proj"] == "q0bf16"
    state = dequantized_state(out)
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    for gname, tensor in reader.items():
        if not gname.endswith("weight") or "norm" in gname:
            continue
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        part = gname.split(".")[-2]
        if part in heads:
            expected = unpermute_rows(expected.reshape(-1, 256), heads[part])
        np.testing.assert_array_equal(state[hf_name(gname)], expected.reshape(
            state[hf_name(gname)].shape), err_msg=gname)
    ours = fmc.load(out).logits(IDS)
    expected = hf_logits_with(checkpoint, state, IDS)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_type_without_a_scheme_names_the_tensor(tiny_checkpoint, tmp_path):
    path = write_gguf_from_checkpoint(tiny_checkpoint("llama-kquant"), tmp_path / "q2.gguf",
                                      {"blk.1.ffn_up.weight": T.Q2_K})
    with pytest.raises(InputError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight': "
                                         r"GGUF type Q2_K has no fmc scheme .*--quant-override"):
        compile_model(CompileOptions(model=str(path), output=tmp_path / "x", quant="gguf"))
    assert not (tmp_path / "x").exists()
    # The suggested override works.
    compile_model(CompileOptions(model=str(path), output=tmp_path / "y", quant="gguf",
                                 quant_overrides=["layers.1.mlp.up_proj=q4k"]))


def test_quant_gguf_needs_a_gguf_input(tiny_checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--quant gguf keeps a GGUF input's own types"):
        compile_model(CompileOptions(model=str(tiny_checkpoint("llama-kquant")),
                                     output=tmp_path / "x", quant="gguf"))
