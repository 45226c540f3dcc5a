"""gemma2 and gemma3 (fmc/frontend/archs/gemma2.py, gemma3.py; fmc/frontend/gemma_model.py)
against transformers, on tiny random checkpoints with every peculiarity biting: soft-caps
small enough to saturate, a sliding window (4) shorter than the prompts, an attention scale
(query_pre_attn_scalar 24) other than head_dim^-0.5, gemma3's distinct local and global RoPE
bases with linear scaling on the global layer, (1 + w) norms with w far from 0."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from models import (
    add_gguf_tensor,
    finish_gguf,
    gguf_name,
    gguf_writer,
    write_random_checkpoint,
    write_word_tokenizer,
)
from test_archs import (
    changed_config_fails_the_comparison,
    hf_model,
    logits_of,
    matches_prefill_and_decode,
)
from test_numerics import PROMPT, TOLERANCE, relative_error
from test_vulkan_runtime import why_no_vulkan

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.frontend import open_model

WINDOW = 4
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=256, query_pre_attn_scalar=24, sliding_window=WINDOW,
              layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
CONFIGS = {
    "gemma2": ("Gemma2Config", dict(attn_logit_softcapping=0.5, final_logit_softcapping=1.5,
                                    rope_parameters={"rope_type": "default",
                                                     "rope_theta": 100.0})),
    "gemma3": ("Gemma3TextConfig", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}})),
}
# A prompt several windows and pages (16 positions) long.
LONG = [int(i) for i in np.random.default_rng(7).integers(2, 160, 40)]


def write_gemma(family: str, directory: Path) -> Path:
    import transformers

    class_name, overrides = CONFIGS[family]
    config = getattr(transformers, class_name)(**{**COMMON, **overrides})
    # norms: w itself (the model scales by 1 + w), far enough from 0 to matter
    return write_random_checkpoint(config, directory, norm=(0.0, 0.3))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(family, quant, target) → (checkpoint, artifact), each built on first use (quant None:
    the checkpoint only)."""
    built: dict = {}

    def get(family: str, quant: str | None = "q0f32",
            target: str = "cpu") -> tuple[Path, Path | None]:
        if family not in built:
            built[family] = (write_gemma(family, tmp_path_factory.mktemp(family)), {})
        checkpoint, artifacts = built[family]
        if quant is None:
            return checkpoint, None
        if (quant, target) not in artifacts:
            out = tmp_path_factory.mktemp("artifacts") / f"{family}-{quant}-{target}"
            compile_model(CompileOptions(model=str(checkpoint), output=out, quant=quant,
                                         target=target))
            artifacts[quant, target] = out
        return checkpoint, artifacts[quant, target]

    return get


# fmc's GPU attention kernels run on Mesa's lavapipe (CI installs it: scripts/test.sh).
TARGETS = ["cpu", pytest.param("vulkan", marks=pytest.mark.skipif(
    why_no_vulkan() is not None, reason=str(why_no_vulkan())))]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_matches_transformers(family, target, gemma):
    """All prefill positions and ten greedy decode steps (the prompt, 11 tokens, is longer
    than the window: one prefill chunk windows its own new tokens). On vulkan: fmc's GPU
    attention kernels, soft-cap and window included."""
    checkpoint, artifact = gemma(family, target=target)
    config = fmc.load(artifact).config
    assert config.architecture == family
    assert config.arch_options["sliding_layers"] == [0]
    assert config.arch_options["query_pre_attn_scalar"] == 24
    matches_prefill_and_decode(fmc.load(artifact), hf_model(checkpoint), steps=10)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_long_prompt_prefilled_in_chunks(family, target, gemma):
    """40 tokens (ten windows, three pages) in chunks of 7: each chunk attends to the cached
    window across page boundaries; then decode steps from the chunked prefill."""
    checkpoint, artifact = gemma(family, target=target)
    model = hf_model(checkpoint)
    engine = fmc.load(artifact)
    engine.prefill_chunk = 7
    expected = logits_of(model, LONG)
    assert relative_error(engine.logits(LONG), expected) <= TOLERANCE
    seq = engine.new_sequence()
    logits = engine.prefill(seq, LONG)
    tokens = list(LONG)
    for _ in range(3):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(seq, tokens[-1])
        assert relative_error(logits, logits_of(model, tokens)[-1]) <= TOLERANCE


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_fork_and_decode_keep_the_window_exact(family, target, gemma):
    """A forked sequence's keys lie in two blocks (the shared prefix and its own); the window
    spans both. Parent and children decode different tokens in one batch, each against a
    transformers forward of its own tokens."""
    checkpoint, artifact = gemma(family, target=target)
    model = hf_model(checkpoint)
    engine = fmc.load(artifact)
    parent = engine.new_sequence()
    engine.prefill(parent, LONG[:20])
    children = [engine.fork(parent), engine.fork(parent, at=11)]
    histories = [LONG[:20], LONG[:20], LONG[:11]]
    seqs = [parent, *children]
    for step in range(5):
        tokens = [int(t) for t in np.random.default_rng(step).integers(2, 160, len(seqs))]
        out = engine.decode_batch(seqs, tokens)
        for row, (history, token) in enumerate(zip(histories, tokens, strict=True)):
            history.append(token)
            assert relative_error(out[row], logits_of(model, history)[-1]) <= TOLERANCE


def test_tensor_parallel_2_equals_one_rank(gemma, tmp_path):
    """gemma3 over 2 ranks (Disco workers): each rank's heads with the replicated (1 + w)
    q/k norms and its own RoPE, the window in its kernels; logits equal the 1-rank ones."""
    checkpoint, artifact = gemma("gemma3")
    compile_model(CompileOptions(model=str(checkpoint), output=tmp_path / "tp2",
                                 tensor_parallel=2))
    assert relative_error(fmc.load(tmp_path / "tp2").logits(PROMPT),
                          fmc.load(artifact).logits(PROMPT)) <= TOLERANCE


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_q4f16_equals_transformers_on_the_dequantized_weights(family, gemma):
    from test_quant import dequantized_state, hf_logits_with

    checkpoint, artifact = gemma(family, "q4f16")
    expected = hf_logits_with(checkpoint, dequantized_state(artifact), PROMPT)
    assert relative_error(fmc.load(artifact).logits(PROMPT), expected) <= TOLERANCE


NEGATIVE_CONTROLS = {
    "gemma2-no-window": ("gemma2", lambda o: {k: v for k, v in o.items()
                                              if k != "sliding_layers"}),
    "gemma3-one-rope-base": ("gemma3", lambda o: {**o, "rope_local_theta": 1000.0}),
}


@pytest.mark.parametrize("control", sorted(NEGATIVE_CONTROLS))
def test_a_peculiarity_switched_off_fails_the_comparison(control, gemma, tmp_path):
    """Negative controls, one peculiarity each: gemma2 without its sliding window (every
    layer global), gemma3 with the global RoPE base on its sliding layer too — each far from
    transformers; the real ones are within bound."""
    family, change = NEGATIVE_CONTROLS[control]
    checkpoint, artifact = gemma(family)

    def options_changed(config):
        return dataclasses.replace(config, arch_options=change(dict(config.arch_options)))

    changed_config_fails_the_comparison(family, options_changed, checkpoint, artifact,
                                        tmp_path / "off")


@pytest.mark.parametrize("setting", ["attn_logit_softcapping", "final_logit_softcapping",
                                     "query_pre_attn_scalar"])
def test_the_tiny_gemma2_settings_bite(setting, gemma):
    """What test_matches_transformers proves fmc computes matters on this checkpoint:
    transformers' own logits move by far more than the bound when a soft-cap is lifted or
    the attention scale is head_dim's."""
    checkpoint, _ = gemma("gemma2", None)
    model = hf_model(checkpoint)
    expected = logits_of(model, PROMPT)
    if setting == "query_pre_attn_scalar":
        for layer in model.model.layers:
            layer.self_attn.scaling = COMMON["head_dim"] ** -0.5
    else:
        setattr(model.config, setting, None)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = model.config.attn_logit_softcapping
    assert relative_error(logits_of(model, PROMPT), expected) > 100 * TOLERANCE


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
              "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "ffn_post_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gemma_gguf(checkpoint: Path, path: Path) -> Path:
    """The checkpoint as llama.cpp's convert_hf_to_gguf.py writes a gemma2/gemma3 file
    (written here independently of fmc's reader): its tensor names, every norm weight
    stored as 1 + w, no Q/K permutation, tied output; the metadata it writes (no
    query_pre_attn_scalar: llama.cpp derives the scale)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[config["model_type"]]
    writer = gguf_writer(path, arch, config)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_sliding_window(config["sliding_window"])
    # the tiny models' pattern (sliding, global) as the per-layer array llama.cpp reads
    writer.add_sliding_window_pattern([kind == "sliding_attention"
                                       for kind in config["layer_types"]])
    rope = config["rope_parameters"]
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_rope_freq_base(rope["rope_theta"])
    else:
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
    for name, array in load_file(str(checkpoint / "model.safetensors")).items():
        if name.endswith("norm.weight"):
            array = array + 1
        add_gguf_tensor(writer, gguf_name(name, GGUF_NAMES), array)
    return finish_gguf(writer, path, config["vocab_size"], bos=2)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gguf_import_equals_hf_import(family, tmp_path):
    """Config and every tensor from the GGUF file equal those from the HF directory (norms
    with llama.cpp's +1 taken off), but the attention scale, which GGUF does not carry:
    llama.cpp's rule gives head_dim (16) where the checkpoint says 24."""
    checkpoint = write_gemma(family, tmp_path / "hf")
    hf = open_model(str(checkpoint))
    gg = open_model(str(write_gemma_gguf(checkpoint, tmp_path / f"{family}.gguf")))
    assert gg.config.arch_options.pop("query_pre_attn_scalar") == 16
    hf.config.arch_options.pop("query_pre_attn_scalar")
    fields = ("architecture", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "rope_theta", "max_position_embeddings", "tie_word_embeddings", "qk_norm",
              "arch_options")
    for field in fields:
        assert getattr(gg.config, field) == getattr(hf.config, field), field
    assert gg.config.rms_norm_eps == pytest.approx(hf.config.rms_norm_eps)  # float32 in GGUF
    assert set(gg.weights.index()) == set(hf.weights.index())
    for name in hf.weights.index():
        np.testing.assert_allclose(gg.weights.load(name), hf.weights.load(name), rtol=0,
                                   atol=1e-7, err_msg=name)


@pytest.mark.parametrize("preset", ["gemma-2-2b", "gemma-3-1b"])
def test_presets_are_the_published_configs(preset):
    config = open_model(preset).config
    options = config.arch_options
    if preset == "gemma-2-2b":
        assert (config.architecture, config.num_hidden_layers, options["sliding_window"],
                options["attn_logit_softcapping"], options["final_logit_softcapping"]) == \
            ("gemma2", 26, 4096, 50.0, 30.0)
        assert options["sliding_layers"] == list(range(0, 26, 2))
    else:
        assert (config.architecture, config.num_hidden_layers, options["sliding_window"],
                config.rope_theta, options["rope_local_theta"]) == \
            ("gemma3", 26, 512, 1e6, 1e4)
        assert [i for i in range(26) if i not in options["sliding_layers"]] == [5, 11, 17, 23]


def test_dry_run_counts_what_the_sliding_layers_would_keep(capsys):
    """gemma-3-1b (22 of 26 layers windowed to 512) at 32768 tokens: the estimate holds every
    layer at full length, as fmc's cache does, and beside it what the cache would hold if the
    sliding layers kept only their window and one prefill chunk. gemma-2-2b's window (4096)
    is its default context: nothing to save, no such line."""
    from fmc.cli import main
    from fmc.compiler import plan_compile

    plan = plan_compile(CompileOptions(model="gemma-3-1b", quant="q4f16",
                                       context_window=32768, prefill_chunk=256))
    config, memory = open_model("gemma-3-1b").config, plan["memory"]
    # float32 K and V: the CPU target keeps activations and the cache in float32
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * 4
    assert memory["kv_cache_bytes"] == 26 * 32768 * per_layer_token
    assert memory["windowed_kv_cache_bytes"] == (4 * 32768 + 22 * (511 + 256)) * per_layer_token
    assert memory["total_bytes"] == memory["weights_bytes"] + memory["kv_cache_bytes"] + \
        memory["workspace_bytes"]  # the total is what fmc allocates
    assert "windowed_kv_cache_bytes" not in plan_compile(
        CompileOptions(model="gemma-2-2b", quant="q4f16"))["memory"]
    assert main(["compile", "gemma-3-1b", "-o", "unused", "--dry-run",
                 "--context-window", "32768", "--prefill-chunk", "256"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sliding window: 22 of 26 layers attend to their last 512 positions" in out
    assert f"the KV cache would be {memory['windowed_kv_cache_bytes'] / 2**20:.1f} MiB" in out


def test_inspect_names_the_sliding_layers(gemma, capsys):
    from fmc.cli import main

    _, artifact = gemma("gemma2")
    assert main(["inspect", str(artifact), "--json"]) == 0
    features = json.loads(capsys.readouterr().out)["features"]
    assert "sliding window 4 on 1 of 2 layers (context not capped)" in features
    assert not any(f.startswith(("sliding_layers=", "sliding_window=")) for f in features)


def test_metal_attention_kernels_carry_the_soft_cap_and_window(gemma):
    """The Metal build's attention kernels (fmc's GPU form) compute the soft-cap (cap·log2(e)
    = 0.5·1.4427 scales the tanh) and the window (a query skips keys more than 3 behind), and
    every kernel type-checks as Metal Shading Language."""
    from tvm import relax

    from fmc.compiler import build_ir
    from fmc.targets.metal import CLANG, check_msl, metal_source, split_kernels

    if not CLANG.path():
        pytest.skip("needs clang++ (apt-get install clang)")
    checkpoint, _ = gemma("gemma2", None)
    state = build_ir(CompileOptions(model=str(checkpoint), target="metal"))
    target = state.target.tvm_target()
    with target:
        kernels = split_kernels(metal_source(relax.build(state.mod, target=target,
                                                         relax_pipeline=None)))
    attention = {name: source for name, source in kernels.items()
                 if name in ("batch_decode_paged_kv_kernel", "batch_prefill_paged_kv_kernel",
                             "batch_prefill_ragged_kv_kernel")}
    assert len(attention) == 3
    for name, source in attention.items():
        assert "7.213475e-01f" in source, name
        assert f"- {WINDOW - 1})" in source, name
    assert check_msl(kernels, CLANG.path()) == []


def test_multimodal_gemma3_reads_its_text_model(tmp_path):
    """A `gemma3` (Gemma3ForConditionalGeneration) directory: `text_config` over
    Gemma3TextConfig's defaults, the language model's tensors under transformers 4's and 5's
    names; the vision tower's are left to the unused-tensor warning."""
    from safetensors.numpy import load_file, save_file

    checkpoint = write_gemma("gemma3", tmp_path / "text")
    text = open_model(str(checkpoint))
    text_config = json.loads((checkpoint / "config.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    for prefix in ("language_model.model.", "model.language_model."):
        directory = tmp_path / prefix.strip(".")
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(
            {"model_type": "gemma3", "text_config": text_config, "eos_token_id": 1}))
        tensors = {prefix + name.removeprefix("model."): array for name, array in state.items()}
        tensors["model.vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)
        save_file(tensors, str(directory / "model.safetensors"))
        write_word_tokenizer(directory, text_config["vocab_size"])
        source = open_model(str(directory))
        assert source.config == text.config
        index = source.weights.index()
        assert set(index) == set(text.weights.index()) | {"model.vision_tower.patch.weight"}
        for name in text.weights.index():
            np.testing.assert_array_equal(source.weights.load(name), text.weights.load(name))
