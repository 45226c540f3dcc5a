"""Mixture recipes (data files) and how a plan picks each tensor's scheme: llama.cpp's
Q4_K_M/Q5_K_M choices, the K-quants' shape fallbacks, user recipe files and their errors."""

from __future__ import annotations

import json

import pytest
from test_quant import matches_transformers_on_its_weights

from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError, UsageError
from fmc.quant.plan import QuantPlan


def more_bits(n: int) -> set[int]:
    """llama.cpp's use_more_bits(i, n), written out: the first and last eighth of the layers
    and every third layer between, in C integer arithmetic."""
    chosen = set(range(n // 8)) | set(range(7 * n // 8, n))
    return chosen | {i for i in range(n // 8, n) if (i - n // 8) % 3 == 2}


@pytest.mark.parametrize("recipe, base", [("q4k_m", "q4k"), ("q5k_m", "q5k")])
@pytest.mark.parametrize("n", [2, 22, 30, 32, 80])
def test_recipe_picks_llama_cpp_tensors(recipe, base, n):
    plan = QuantPlan.parse(recipe)
    plan.bind(n)
    big = (4096, 4096)  # every K-quant fits
    for i in range(n):
        for layer, bumped in (("self_attn.v_proj", True), ("mlp.down_proj", True),
                              ("self_attn.q_proj", False), ("mlp.up_proj", False)):
            want = "q6k" if bumped and i in more_bits(n) else base
            assert plan.scheme_for(f"model.layers.{i}.{layer}", False, big).name == want
    assert plan.scheme_for("lm_head", True, big).name == "q6k"
    assert plan.scheme_for("model.embed_tokens", False, big).name == base


def test_k_quants_fall_back_like_llama_cpp_on_smollm2_shapes():
    """SmolLM2's hidden size 576 is not a multiple of 256: Q4_K → Q5_0, Q5_K → Q5_1,
    Q6_K → Q8_0; down_proj (K = 1536) keeps its K-quant; a K of 48 falls to q0f16."""
    plan = QuantPlan.parse("q4k_m")
    plan.bind(30)
    assert plan.scheme_for("model.layers.4.self_attn.q_proj", False, (576, 576)).name == "q5_0"
    assert plan.scheme_for("model.layers.0.self_attn.v_proj", False, (192, 576)).name == "q8f16"
    assert plan.scheme_for("model.layers.0.mlp.down_proj", False, (576, 1536)).name == "q6k"
    assert plan.scheme_for("model.layers.4.mlp.down_proj", False, (576, 1536)).name == "q4k"
    assert plan.scheme_for("model.embed_tokens", True, (49152, 576)).name == "q8f16"
    assert plan.scheme_for("model.layers.4.mlp.up_proj", False, (8, 48)).name == "q0f16"
    q5 = QuantPlan.parse("q5k")
    assert q5.scheme_for("model.layers.4.mlp.up_proj", False, (1536, 576)).name == "q5_1"


def test_q4k_m_model_equals_transformers(tiny_checkpoint, tiny_artifact):
    """Two layers: layer 1 is a 'more bits' layer (i ≥ 7n/8), so its v_proj and down_proj are
    q6k beside q4k elsewhere; the compiled model equals transformers on the same weights."""
    artifact = tiny_artifact("llama-kquant", "q4k_m")
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["quantization"]["layers"]
    assert manifest["quantization"]["default"] == "q4k_m"
    assert layers["model.layers.1.self_attn.v_proj"] == "q6k"
    assert layers["model.layers.1.mlp.down_proj"] == "q6k"
    assert layers["model.layers.0.mlp.down_proj"] == "q4k"
    assert layers["model.layers.0.self_attn.v_proj"] == "q4k"
    assert layers["lm_head"] == "q6k"
    matches_transformers_on_its_weights(artifact, tiny_checkpoint("llama-kquant"))


def test_a_users_recipe_file(tiny_checkpoint, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\ndefault = "q5_1"\noutput = "q8f16"\n'
                      '[[rule]]\nmatch = "mlp.*"\nlayers = "i == n - 1"\nscheme = "q4k"\n')
    out = tmp_path / "out"
    result = compile_model(CompileOptions(model=str(tiny_checkpoint("llama-kquant")),
                                          output=out, quant_recipe=str(recipe)))
    quantization = json.loads((out / "manifest.json").read_text())["quantization"]
    assert quantization["default"] == "mine"
    assert quantization["recipe"]["rules"] == ["mlp.*=q4k if i == n - 1"]
    layers = quantization["layers"]
    assert layers["model.layers.1.mlp.up_proj"] == "q4k"
    assert layers["model.layers.0.mlp.up_proj"] == "q5_1" and layers["lm_head"] == "q8f16"
    assert recipe.resolve() in result.input_files  # depfiles and the cache see the file


@pytest.mark.parametrize("text, message", [
    ("default = q4k", "not a valid TOML recipe"),
    ('default = "q4k"\nextra = 1', "unknown recipe key 'extra'"),
    ('output = "q6k"', "default must be a non-empty string"),
    ('default = "q9"', "unknown quantization scheme 'q9'"),
    ('default = "q4k"\n[[rule]]\nmatch = "x"\nscheme = "q4k"\nlayers = "__import__(1)"',
     r"rule 1: layers = '__import__\(1\)' is not a layer expression"),
    ('default = "q4k"\n[[rule]]\nmatch = "x"', "rule 1: scheme must be a non-empty string"),
])
def test_bad_recipe_files_name_the_file_and_field(text, message, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        QuantPlan.parse("", recipe_file=recipe)
    assert str(recipe) in str(info.value)


def test_quant_and_recipe_together_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--quant and --quant-recipe"):
        compile_model(CompileOptions(model="smollm2-135m", output=tmp_path / "x", quant="q4k",
                                     quant_recipe=str(tmp_path / "r.toml")))


def test_layer_expressions_use_c_integer_division():
    from fmc.quant.recipe import LayerSelector

    selector = LayerSelector("(i - n // 8) % 3 == 2", "test")
    # C: (1 - 3) % 3 == -2, Python would say 1; neither is 2 here, but -1 % 3 is 2 in Python.
    assert not selector.matches(2, 24)  # (2 - 3) % 3 == -1 in C
    assert selector.matches(5, 24)
