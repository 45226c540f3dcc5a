"""Quantization: each scheme against an independent numpy reference, fused kernels against
dequantize(W) @ x, quantized models against transformers on the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fmc
from fmc.artifacts.safetensors_reader import SafetensorsFile
from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError
from fmc.quant import all_schemes, get, load_plugin

EXAMPLE_PLUGIN = Path(__file__).parent.parent / "examples" / "quant_plugin_int3.py"
BUILTIN_SCHEMES = {"q0f32", "q0f16", "q0bf16", "q4f16", "q4f32", "q4_0", "q4_1", "q5_0",
                   "q5_1", "q8f16", "nf4", "q4k", "q5k", "q6k"}
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def weight(rows=48, k=256, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    w[3, :64] = 0.0  # an all-zero group must not divide by zero
    return w


def unpack(words):
    """Element j of a row = nibble j % 8 (low first) of word j // 8 — written independently."""
    rows, count = words.shape
    out = np.zeros((rows, count * 8), dtype=np.uint8)
    for j in range(count * 8):
        out[:, j] = (words[:, j // 8] >> np.uint32(4 * (j % 8))) & 0xF
    return out


@pytest.mark.parametrize("name, scale_dtype", [("q4f16", np.float16), ("q4f32", np.float32)])
def test_q4_codes_and_values(name, scale_dtype):
    """MLC's q4f16_1 layout: value = (code − 7)·scale with codes in 0..15 (fmc also uses
    code 15, which the dequantize decodes as 8·scale)."""
    w = weight()
    scheme = get(name)
    stored = scheme.quantize(w)
    words, scales = stored
    assert words.dtype == np.uint32 and words.shape == (48, 32)
    assert scales.dtype == scale_dtype and scales.shape == (48, 8)
    codes = unpack(words)
    g = scales.astype(np.float32).repeat(32, axis=1)
    np.testing.assert_array_equal((codes.astype(np.float32) - 7) * g, scheme.dequantize(stored))
    assert (scales[3, :2] == 0).all() and (codes[3, :64] == 7).all()  # zero groups stay zero
    assert np.abs(scheme.dequantize(stored) - w).max() <= np.abs(g).max() * 0.5 + 1e-6


@pytest.mark.parametrize("name", sorted(BUILTIN_SCHEMES))
def test_row_interleaved_layout_is_the_scheme_in_blocks_of_rows(name):
    """`NAME_rows16` stores NAME's arrays with 16 rows innermost; numpy and TE dequantize
    (through the row views) give NAME's values bit for bit."""
    import tvm
    from tvm import te

    base, wrapped = get(name), get(f"{name}_rows16")
    w = weight(rows=48, k=512)
    plain, blocked = base.quantize(w), wrapped.quantize(w)
    for part, (p, b, spec) in enumerate(zip(plain, blocked, wrapped.storage(w.shape, "w"),
                                            strict=True)):
        assert b.shape == spec.shape == (3, *p.shape[1:], 16), part
        for row in (0, 17, 47):
            np.testing.assert_array_equal(b[row // 16, ..., row % 16], p[row])
    np.testing.assert_array_equal(wrapped.dequantize(blocked), base.dequantize(plain))
    placeholders = [te.placeholder(a.shape, str(a.dtype)) for a in blocked]
    out = wrapped.dequantize_te(placeholders, "float32")
    kernel = tvm.compile(te.create_prim_func([*placeholders, out]), "llvm")
    result = tvm.runtime.tensor(np.zeros(w.shape, np.float32))
    kernel(*[tvm.runtime.tensor(a) for a in blocked], result)
    np.testing.assert_array_equal(result.numpy(), base.dequantize(plain))


def test_row_blocks_of_a_big_tensor_are_quantized_whole(monkeypatch):
    """Big tensors are quantized in row blocks to bound memory; an interleaved scheme's blocks
    must stay whole (a 49152-row embedding once split at row 29127)."""
    from fmc.quant import convert

    monkeypatch.setattr(convert, "ROW_BLOCK_BYTES", 37 * 256 * 4)  # 37 rows per step
    scheme = get("q0f16_rows16")
    w = weight(rows=96, k=256)
    parts = convert.quantize_rows(scheme, w)
    np.testing.assert_array_equal(parts[0], scheme.quantize(w)[0])


def test_rows_the_block_does_not_divide_keep_the_plain_layout(tiny_artifact):
    """llama-tied has 24-row k/v projections: those stay row-major (and fuse with each
    other), the 48-row ones are interleaved; both kinds compute the same model."""
    artifact = tiny_artifact("llama-tied", "q0f16")
    params = {p["name"]: p for p in json.loads((artifact / "manifest.json").read_text())[
        "params"]}
    assert params["model.layers.0.self_attn.q_proj.weight"]["shape"] == [3, 48, 16]
    assert params["model.layers.0.self_attn.k_proj+v_proj.weight"]["shape"] == [48, 48]
    ours = fmc.load(artifact).logits(IDS)
    full = fmc.load(tiny_artifact("llama-tied")).logits(IDS)
    assert np.abs(ours - full).max() <= 2e-3 * np.abs(full).max()


def test_nf4_code_book_and_nearest_code():
    from fmc.quant.nf4 import CODE_BOOK

    np.testing.assert_array_equal(CODE_BOOK, np.array(QLORA_NF4, dtype=np.float32))
    w = weight(k=128)
    words, scales = get("nf4").quantize(w)
    assert scales.shape == (48, 2)
    scale = scales.astype(np.float32).repeat(64, axis=1)
    normalized = np.divide(w, scale, out=np.zeros_like(w), where=scale != 0)
    nearest = np.abs(normalized[..., None] - np.array(QLORA_NF4)).argmin(-1)
    np.testing.assert_array_equal(unpack(words), nearest)  # the nearest code for the scale
    np.testing.assert_array_equal(get("nf4").dequantize([words, scales]),
                                  np.array(QLORA_NF4, dtype=np.float32)[nearest] * scale)


@pytest.mark.parametrize("name", ["q4f16", "q4f32", "q8f16", "q4_0", "nf4", "q4_1", "q5_0",
                                  "q4k", "q6k"])
def test_group_size_that_does_not_divide_names_the_tensor(name):
    with pytest.raises(InputError, match="tensor 'layer.weight': reduction dimension 48 is "
                                         f"not a multiple of {name}'s group size"):
        get(name).storage((8, 48), "layer.weight")


def test_bad_group_size_fails_the_compile_naming_the_tensor(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError,
                       match=r"tensor 'model\.[\w.]+\.weight': reduction dimension 48 "):
        compile_model(CompileOptions(model=str(tiny_checkpoint("llama-tied")),
                                     output=tmp_path / "x", quant="q4f16"))
    assert not (tmp_path / "x").exists()


def dequantized_state(artifact: Path) -> dict[str, np.ndarray]:
    """The artifact's weights as float32 checkpoint tensors, dequantized in numpy (fused
    parameters are split back into their members' rows; a quantized mixture-of-experts
    stack [experts, …] each expert on its own, as the compiler quantized it)."""
    from fmc.quant import experts

    manifest = json.loads((artifact / "manifest.json").read_text())
    stored: dict[str, dict[int, np.ndarray]] = {}
    schemes = {}
    for entry in manifest["params"]:
        array = SafetensorsFile(artifact / entry["shard"]).load(entry["name"])
        members = entry.get("fused_from") or [
            {"source": entry["source"], "part": None, "rows": [0, array.shape[0]]}]
        for member in members:
            parts = stored.setdefault(member["source"], {})
            part = len(parts) if member["part"] is None else member["part"]
            parts[part] = array[member["rows"][0]:member["rows"][1]]
            schemes[member["source"]] = entry["scheme"]
    state = {}
    for source, parts in stored.items():
        arrays = [parts[i] for i in sorted(parts)]
        scheme = schemes[source]
        if scheme is None:
            state[source] = arrays[0].astype(np.float32)
        elif ".experts." in source:
            state[source] = experts.dequantize(get(scheme), arrays)
        else:
            state[source] = get(scheme).dequantize(arrays)
    return state


def hf_logits_with(checkpoint, state, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


IDS = [5, 9, 100, 3, 44, 150, 7, 7, 12]
# Logit error of each scheme against the fp32 model on the tiny random checkpoint, as
# max|Δ| / max|logit|. Measured (2026-11-25, absmax scales): q8f16 0.021, q4f16 0.31 —
# random tiny weights are harsher than trained ones; bounds are 1.5× those. Every other
# scheme's kernels are checked against transformers by the every-scheme model below.
QUALITY_BOUND = {"q8f16": 0.032, "q4f16": 0.47}


def matches_transformers_on_its_weights(artifact: Path, checkpoint: Path) -> np.ndarray:
    """The artifact's logits on IDS, asserted equal (to float32 rounding) to transformers'
    on the artifact's dequantized weights: every fused kernel computes dequantize(W)·x."""
    ours = fmc.load(artifact).logits(IDS)
    expected = hf_logits_with(checkpoint, dequantized_state(artifact), IDS)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()
    return ours


@pytest.mark.parametrize("name", sorted(QUALITY_BOUND))
def test_quantized_model_kernels_and_quality(name, tiny_checkpoint, tiny_artifact):
    """The compiled quantized model equals transformers running the same dequantized weights
    (so every fused kernel computes dequantize(W)·x), and stays near the fp32 model."""
    checkpoint = tiny_checkpoint("llama-quant")
    artifact = tiny_artifact("llama-quant", name)
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["quantization"]["layers"]
    assert layers["model.layers.0.mlp.down_proj"] == name
    assert layers["model.embed_tokens"] == (get(name).output_scheme or name)  # tied: output
    ours = matches_transformers_on_its_weights(artifact, checkpoint)
    full = fmc.load(tiny_artifact("llama-quant")).logits(IDS)
    error = np.abs(ours - full).max() / np.abs(full).max()
    assert error <= QUALITY_BOUND[name], error


def test_overrides_choose_per_layer_schemes(tiny_checkpoint, tmp_path):
    out = tmp_path / "nf4"
    compile_model(CompileOptions(
        model=str(tiny_checkpoint("llama-gqa-untied")), output=out, quant="q4f16",
        quant_overrides=["lm_head=q0f16", "embed_tokens=q8f16", "layers.1.mlp.*=q8f16"]))
    layers = json.loads((out / "manifest.json").read_text())["quantization"]["layers"]
    assert layers["lm_head"] == "q0f16" and layers["model.embed_tokens"] == "q8f16"
    assert layers["model.layers.1.mlp.up_proj"] == "q8f16"
    assert layers["model.layers.0.mlp.up_proj"] == "q4f16"
    assert layers["model.layers.1.self_attn.q_proj"] == "q4f16"
    matches_transformers_on_its_weights(out, tiny_checkpoint("llama-gqa-untied"))


def test_plugin_from_a_file_outside_the_package(tiny_checkpoint, tmp_path):
    assert "int3" in load_plugin(EXAMPLE_PLUGIN)
    assert "int3" in all_schemes()
    out = tmp_path / "int3"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-gqa-untied")), output=out,
                                 quant="int3", quant_plugins=[str(EXAMPLE_PLUGIN)]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["layers"]["model.layers.0.self_attn.q_proj"] == "int3"
    assert any(p["dtype"] == "uint8" for p in manifest["params"])
    matches_transformers_on_its_weights(out, tiny_checkpoint("llama-gqa-untied"))


def test_plugin_that_registers_nothing_is_an_error(bad_plugins):
    with pytest.raises(InputError, match="registers no quantization scheme"):
        load_plugin(bad_plugins[1])


def test_quant_list_cli(capsys):
    from fmc.cli import main

    assert main(["quant", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"q0f32", "q0f16", "q4f16", "q4f32", "q8f16", "nf4", "q4_0"} <= set(rows)
    assert rows["q4f16"]["storage"] == "q_weight uint32[N, K/8], q_scale float16[N, K/32]"
    assert rows["q8f16"]["gguf_lossless"] == ["Q8_0"]


def test_every_scheme_in_one_model_equals_transformers(tiny_checkpoint, tmp_path):
    """The K-quant tiny model with one weight matrix in every built-in scheme (including the
    tied-off output head and the embedding) equals transformers on its dequantized weights."""
    from models import EVERY_SCHEME, EVERY_SCHEME_OVERRIDES

    checkpoint = tiny_checkpoint("llama-kquant")
    out = tmp_path / "every"
    compile_model(CompileOptions(model=str(checkpoint), output=out, quant="q4f16",
                                 quant_overrides=EVERY_SCHEME_OVERRIDES))
    layers = json.loads((out / "manifest.json").read_text())["quantization"]["layers"]
    for layer, scheme in EVERY_SCHEME.items():
        assert layers[next(k for k in layers if k.endswith(layer))] == scheme, layer
    # q0f32 is the CPU's compute dtype (no dequantize); q4f16 shares q4f32's kernels
    assert set(EVERY_SCHEME.values()) == BUILTIN_SCHEMES - {"q0f32", "q4f16"}
    matches_transformers_on_its_weights(out, checkpoint)
