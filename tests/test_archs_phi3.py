"""phi3 (fmc/frontend/archs/phi3.py) against transformers.

A tiny random Phi-3 with LongRoPE (original_max_position_embeddings 16 of 64, distinct long
and short factors, attention factor √1.5) and partial rotary (8 of 16 features per head):
prompts shorter and longer than 16 tokens, and decode steps that cross 16, so both factor
sets and the switch between them are exercised. transformers picks the factors per forward
call by its largest position; the decode references therefore run transformers step by step
through its own cache, as generation does. The q4f16 test uses Phi-3-mini's kind of config
instead (plain RoPE over the whole head, a sliding window)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from models import add_gguf_tensor, finish_gguf, gguf_name, gguf_writer, write_random_checkpoint
from test_archs import hf_model, logits_of
from test_numerics import PROMPT, TOLERANCE, relative_error

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.frontend import open_model

ORIGINAL = 16
PHI3 = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=64, original_max_position_embeddings=ORIGINAL,
            partial_rotary_factor=0.5, rope_theta=10000.0, sliding_window=None,
            rope_scaling={"rope_type": "longrope", "long_factor": [1.0, 2.5, 6.0, 13.0],
                          "short_factor": [1.0, 1.3, 1.7, 2.2]},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
LONG_PROMPT = [int(i) for i in np.random.default_rng(7).integers(2, 160, 20)]


# Phi-3-mini's kind: plain RoPE over the whole head, a sliding window (capping the context).
PHI3_PLAIN = {**PHI3, "rope_scaling": None, "partial_rotary_factor": 1.0, "sliding_window": 32}


def write_phi3(directory, values: dict):
    import transformers

    return write_random_checkpoint(transformers.Phi3Config(**values), directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_phi3(tmp_path_factory.mktemp("phi3"), PHI3)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("phi3-artifact") / "q0f32"
    compile_model(CompileOptions(model=str(checkpoint), output=out))
    return out


class HFSequence:
    """One sequence run through transformers' cache, call by call (as generation does)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache(config=model.config)

    def feed(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), cache=self.cache, use_cache=True)
        return out.logits[0].numpy()


def decode_alongside(engine, seq, reference: HFSequence, logits, steps: int):
    """Greedy steps fed to both; every step's logits within the bound."""
    for _ in range(steps):
        token = int(np.argmax(logits))
        logits = engine.decode(seq, token)
        assert relative_error(logits, reference.feed([token])[-1]) <= TOLERANCE


def test_config_and_split_weights(checkpoint):
    """LongRoPE and partial rotary reach the config (in float32, as transformers applies
    them); qkv_proj and gate_up_proj come out as llama's layers, rows in order."""
    from safetensors.numpy import load_file

    source = open_model(str(checkpoint))
    config = source.config
    assert config.architecture == "phi3" and config.head_dim == 16
    assert config.arch_options == {"rotary_dim": 8}
    scaling = config.rope_scaling
    assert scaling["rope_type"] == "longrope"
    assert scaling["original_max_position_embeddings"] == ORIGINAL
    assert scaling["attention_factor"] == float(np.float32(math.sqrt(1.5)))
    assert scaling["long_factor"] == [1.0, 2.5, 6.0, 13.0]
    assert config.features()[0] == "longrope RoPE scaling"
    state = load_file(str(checkpoint / "model.safetensors"))
    qkv = state["model.layers.1.self_attn.qkv_proj.weight"]
    gate_up = state["model.layers.0.mlp.gate_up_proj.weight"]
    index = source.weights.index()
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in index)
    for name, expected in [("model.layers.1.self_attn.q_proj.weight", qkv[:64]),
                           ("model.layers.1.self_attn.k_proj.weight", qkv[64:96]),
                           ("model.layers.1.self_attn.v_proj.weight", qkv[96:]),
                           ("model.layers.0.mlp.gate_proj.weight", gate_up[:96]),
                           ("model.layers.0.mlp.up_proj.weight", gate_up[96:])]:
        assert index[name].shape == expected.shape
        np.testing.assert_array_equal(source.weights.load(name), expected)


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short", "long"])
def test_prefill_and_decode_match_transformers(prompt, artifact, hf):
    """Every prefill position (short factors for 11 tokens, long ones for 20) and ten decode
    steps: from the short prompt they cross position 16, where transformers (and fmc)
    switch to the long factors for the new tokens."""
    engine = fmc.load(artifact)
    expected = logits_of(hf, prompt)
    assert relative_error(engine.logits(prompt), expected) <= TOLERANCE
    seq = engine.new_sequence()
    reference = HFSequence(hf)
    logits = engine.prefill(seq, prompt)
    assert relative_error(logits, reference.feed(prompt)[-1]) <= TOLERANCE
    assert relative_error(logits, expected[-1]) <= TOLERANCE
    decode_alongside(engine, seq, reference, logits, steps=10)


def test_chunked_prefill_matches_transformers_chunk_by_chunk(artifact, hf):
    """In chunks of 8 the long prompt's first two chunks end before position 16 and use the
    short factors, as transformers fed the same chunks does — unlike one 20-token call."""
    engine = fmc.load(artifact)
    engine.prefill_chunk = 8
    reference = HFSequence(hf)
    chunked = np.concatenate([reference.feed(LONG_PROMPT[i:i + 8]) for i in (0, 8, 16)])
    ours = engine.logits(LONG_PROMPT)
    assert relative_error(ours, chunked) <= TOLERANCE
    assert relative_error(ours, logits_of(hf, LONG_PROMPT)) > 100 * TOLERANCE
    seq = engine.new_sequence()
    logits = engine.prefill(seq, LONG_PROMPT)
    assert relative_error(logits, chunked[-1]) <= TOLERANCE
    decode_alongside(engine, seq, reference, logits, steps=3)


def test_packed_prompts_and_batched_decode_decide_per_sequence(artifact, hf):
    """Two prompts packed into one forward step (one short, one long) and decoded together
    (the short one crossing 16 meanwhile) equal each sequence run alone in transformers."""
    engine = fmc.load(artifact)
    seqs = [engine.new_sequence(), engine.new_sequence()]
    references = [HFSequence(hf), HFSequence(hf)]
    prompts = [PROMPT, LONG_PROMPT]
    logits = engine.prefill_batch(seqs, prompts)
    for row, reference, prompt in zip(logits, references, prompts, strict=True):
        assert relative_error(row, reference.feed(prompt)[-1]) <= TOLERANCE
    for _ in range(7):
        tokens = [int(np.argmax(row)) for row in logits]
        logits = engine.decode_batch(seqs, tokens)
        for row, reference, token in zip(logits, references, tokens, strict=True):
            assert relative_error(row, reference.feed([token])[-1]) <= TOLERANCE


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short", "long"])
def test_without_longrope_the_comparison_fails(prompt, checkpoint, artifact):
    """Negative control: transformers with LongRoPE switched off (plain RoPE over the same
    rotary features) is far from the artifact, for the short factors and the long ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    config.rope_parameters = {"rope_type": "default", "rope_theta": PHI3["rope_theta"],
                              "partial_rotary_factor": PHI3["partial_rotary_factor"]}
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, config=config,
                                                 dtype=torch.float32).eval()
    ours = fmc.load(artifact).logits(prompt)
    assert relative_error(ours, logits_of(plain, prompt)) > 100 * TOLERANCE


def test_q4f16_equals_transformers_on_the_dequantized_weights(tmp_path, capsys):
    """Quantized, on Phi-3-mini's kind of config (plain RoPE over the whole head, a sliding
    window): the split q/k/v and gate/up (fused again by the compiler) compute what
    transformers computes with the artifact's dequantized weights, stacked back into
    qkv_proj and gate_up_proj. `fmc inspect` names the features."""
    from test_quant import dequantized_state, hf_logits_with

    from fmc.cli import main

    checkpoint = write_phi3(tmp_path / "plain", PHI3_PLAIN)
    out = tmp_path / "q4f16"
    compile_model(CompileOptions(model=str(checkpoint), output=out, quant="q4f16"))
    state = dequantized_state(out)
    for layer in range(PHI3["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        state[prefix + "self_attn.qkv_proj.weight"] = np.concatenate(
            [state.pop(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv"])
        state[prefix + "mlp.gate_up_proj.weight"] = np.concatenate(
            [state.pop(f"{prefix}mlp.{p}_proj.weight") for p in ("gate", "up")])
    expected = hf_logits_with(checkpoint, state, LONG_PROMPT)
    assert relative_error(fmc.load(out).logits(LONG_PROMPT), expected) <= TOLERANCE
    assert main(["inspect", str(out), "--json"]) == 0
    features = json.loads(capsys.readouterr().out)["features"]
    assert features == ["sliding window 32 (caps the context)", "untied embeddings"]


def write_phi3_gguf(checkpoint, path, qkv_type=None):
    """The tiny checkpoint as llama.cpp's convert_hf_to_gguf.py writes a Phi-3 (written
    independently of fmc): attn_qkv and ffn_up (gate and up) fused, the rotary width as
    rope.dimension_count, the factors as tensors, the attention factor as metadata."""
    from safetensors.numpy import load_file

    c = PHI3
    state = load_file(str(checkpoint / "model.safetensors"))
    writer = gguf_writer(path, "phi3", c)
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_scaling_orig_ctx_len(ORIGINAL)
    writer.add_rope_dimension_count(
        int(c["partial_rotary_factor"] * c["hidden_size"]) // c["num_attention_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_sliding_window(0)
    scale = c["max_position_embeddings"] / ORIGINAL
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(ORIGINAL)))
    for key in ("long_factor", "short_factor"):
        name = f"rope_factors_{key.split('_')[0]}.weight"
        writer.add_tensor(name, np.array(c["rope_scaling"][key], dtype=np.float32))
    names = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, array in state.items():
        gname = gguf_name(name, names)
        add_gguf_tensor(writer, gname, array,
                        qkv_type if gname.endswith("attn_qkv.weight") else None)
    return finish_gguf(writer, path, c["vocab_size"])


def test_gguf_import_equals_hf_import(checkpoint, tmp_path):
    """A phi3 GGUF gives the checkpoint's config (eps aside: GGUF stores float32) and every
    tensor, split alike; a quantized attn_qkv splits into whole rows of its blocks."""
    import gguf

    from_hf = open_model(str(checkpoint))
    from_gguf = open_model(str(write_phi3_gguf(checkpoint, tmp_path / "phi3.gguf")))
    hf_config, gguf_config = from_hf.config.to_dict(), from_gguf.config.to_dict()
    assert gguf_config.pop("rms_norm_eps") == pytest.approx(hf_config.pop("rms_norm_eps"))
    assert gguf_config == hf_config
    index = from_hf.weights.index()
    assert {n: i.shape for n, i in from_gguf.weights.index().items()} == \
        {n: i.shape for n, i in index.items()}
    for name in index:
        np.testing.assert_array_equal(from_gguf.weights.load(name),
                                      from_hf.weights.load(name), err_msg=name)

    quantized = open_model(str(write_phi3_gguf(checkpoint, tmp_path / "q8.gguf",
                                               gguf.GGMLQuantizationType.Q8_0))).weights
    kind, fused = quantized.source.raw("model.layers.0.self_attn.qkv_proj.weight")
    kind_k, blocks_k = quantized.raw("model.layers.0.self_attn.k_proj.weight")
    assert kind == kind_k == "Q8_0"
    np.testing.assert_array_equal(blocks_k, fused[64:96])
    np.testing.assert_allclose(quantized.load("model.layers.0.self_attn.k_proj.weight"),
                               from_hf.weights.load("model.layers.0.self_attn.k_proj.weight"),
                               atol=0.01)


@pytest.mark.parametrize("preset, params", [("phi-3-mini-4k", 3_821_079_552),
                                            ("phi-4-mini", 3_836_021_760)])
def test_presets_have_the_published_sizes(preset, params):
    """Parameter counts of microsoft/Phi-3-mini-4k-instruct and Phi-4-mini-instruct."""
    config = open_model(preset).config
    assert config.architecture == "phi3" and config.param_count() == params
    if preset == "phi-4-mini":
        assert config.arch_options == {"rotary_dim": 96} and config.tie_word_embeddings
        assert config.rope_scaling["attention_factor"] == \
            pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    else:
        assert config.rope_scaling is None and config.context_window == 2047


def test_tensor_parallel_ranks_split_each_fused_part_by_its_heads(checkpoint):
    """Under --tensor-parallel 2 each rank holds its query heads' rows of q, its KV heads'
    rows of k and v, and its half of gate and up — cut from qkv_proj and gate_up_proj part
    by part, not from the fused rows."""
    from safetensors.numpy import load_file

    from fmc.frontend.tensor_parallel import ShardedWeights

    state = load_file(str(checkpoint / "model.safetensors"))
    qkv = state["model.layers.0.self_attn.qkv_proj.weight"]
    gate_up = state["model.layers.0.mlp.gate_up_proj.weight"]
    q, k, v = qkv[:64], qkv[64:96], qkv[96:]
    gate, up = gate_up[:96], gate_up[96:]
    weights = open_model(str(checkpoint)).weights
    for rank in range(2):
        shard = ShardedWeights(weights, rank, 2)
        for name, whole in [("self_attn.q_proj", q), ("self_attn.k_proj", k),
                            ("self_attn.v_proj", v), ("mlp.gate_proj", gate),
                            ("mlp.up_proj", up)]:
            rows = whole.shape[0] // 2
            np.testing.assert_array_equal(shard.load(f"model.layers.0.{name}.weight"),
                                          whole[rank * rows:(rank + 1) * rows], err_msg=name)
