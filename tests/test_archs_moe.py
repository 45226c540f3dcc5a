"""The mixture-of-experts families, mixtral and qwen3_moe (fmc/frontend/archs/mixtral.py,
qwen3_moe.py): tiny random checkpoints with 4 experts, top-2.

Their float32 logits at every prefill position and over ten decode steps are compared with
transformers in test_numerics.py (TINY_MODELS "mixtral" and "qwen3-moe"); here: the config
and weight mapping (per-expert tensors stacked), q4f16 with per-expert quantization against
transformers on the dequantized weights, a negative control per family (norm_topk_prob
flipped), a batched decode whose sequences route to different experts against their solo
runs, tensor parallelism over the experts' width, the presets' published sizes (total and
active parameters) and the refused settings."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from test_archs import (
    changed_config_fails_the_comparison,
    hf_model,
    logits_of,
    matches_prefill_and_decode,
)
from test_numerics import PROMPT, TOLERANCE, relative_error

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError
from fmc.frontend import open_model


def _experts_of(config: dict) -> int:
    return config.get("num_local_experts") or config["num_experts"]


@pytest.mark.parametrize("name, arch, router, gate", [
    ("mixtral", "mixtral", "block_sparse_moe.gate", "block_sparse_moe.experts.w1"),
    ("qwen3-moe", "qwen3_moe", "mlp.gate", "mlp.experts.gate_proj")])
def test_config_and_stacked_expert_weights(tiny_checkpoint, name, arch, router, gate):
    """The checkpoint's per-expert tensors (`experts.<i>.…`, as transformers saves them) are
    one stacked tensor per projection [experts, out, in], loaded in expert order."""
    from safetensors.numpy import load_file

    checkpoint = tiny_checkpoint(name)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    source = open_model(str(checkpoint))
    config = source.config
    experts = _experts_of(hf_config)
    assert (config.architecture, config.num_experts, config.num_experts_per_tok) == \
        (arch, experts, hf_config["num_experts_per_tok"])
    width = hf_config.get("moe_intermediate_size", hf_config["intermediate_size"])
    assert config.intermediate_size == width and config.norm_topk_prob
    assert config.qk_norm == (arch == "qwen3_moe")
    index = source.weights.index()
    stacked = f"model.layers.1.{gate}.weight"
    assert index[stacked].shape == (experts, width, config.hidden_size)
    assert index[f"model.layers.1.{router}.weight"].shape == (experts, config.hidden_size)
    assert not any(".experts.0." in n for n in index)
    state = load_file(str(checkpoint / "model.safetensors"))
    each = [state[stacked.replace(".experts.", f".experts.{e}.")] for e in range(experts)]
    np.testing.assert_array_equal(source.weights.load(stacked), np.stack(each))
    assert f"mixture of experts: 2 of {experts} per token, top-k weights renormalised" in \
        config.features()


def _per_expert_checkpoint(artifact, checkpoint, directory):
    """The artifact's weights dequantized in numpy, written as an HF checkpoint with
    per-expert tensors (stacked experts split back), beside the original config."""
    from safetensors.numpy import save_file
    from test_quant import dequantized_state

    state = {}
    for source, value in dequantized_state(artifact).items():
        if ".experts." in source and value.ndim == 3:
            for e in range(value.shape[0]):
                state[source.replace(".experts.", f".experts.{e}.")] = \
                    np.ascontiguousarray(value[e])
        else:
            state[source] = value
    directory.mkdir()
    shutil.copy(checkpoint / "config.json", directory / "config.json")
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_mixtral_q4f16_equals_transformers_on_the_dequantized_weights(
        tiny_checkpoint, tiny_artifact, tmp_path, capsys):
    """q4f16: every expert quantized on its own (stacked parts [experts, …]), the router kept
    float; prefill and decode equal transformers run on the artifact's dequantized
    weights."""
    from fmc.cli import main

    artifact = tiny_artifact("mixtral", "q4f16")
    manifest = json.loads((artifact / "manifest.json").read_text())
    params = {p["name"]: p for p in manifest["params"]}
    w2 = params["model.layers.0.block_sparse_moe.experts.w2.q_weight"]
    # each expert [64, 96] row-interleaved in blocks of 16 rows, as the CPU stores a dense
    # weight: [experts, rows / 16, words, 16]
    assert (w2["scheme"], w2["shape"]) == ("q4f16_rows16", [4, 64 // 16, 96 // 8, 16])
    assert params["model.layers.0.block_sparse_moe.gate.weight"]["scheme"] is None
    reference = _per_expert_checkpoint(artifact, tiny_checkpoint("mixtral"), tmp_path / "deq")
    matches_prefill_and_decode(fmc.load(artifact), hf_model(reference), steps=4)
    assert main(["inspect", str(artifact), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "mixture of experts: 2 of 4 per token, top-k weights renormalised" in \
        summary["features"]


@pytest.mark.parametrize("name, arch", [("mixtral", "mixtral"), ("qwen3-moe", "qwen3_moe")])
def test_flipped_top_k_renormalisation_fails_the_comparison(
        tiny_checkpoint, tiny_artifact, tmp_path, name, arch):
    """Negative control: the same checkpoint compiled with norm_topk_prob flipped (registered
    in-process) is far from transformers; the real one is within bound."""
    changed_config_fails_the_comparison(
        arch,
        lambda config: dataclasses.replace(config, norm_topk_prob=not config.norm_topk_prob),
        tiny_checkpoint(name), tiny_artifact(name), tmp_path / "flipped")


def _routes(model, ids: list[int]) -> list[set[int]]:
    """transformers' chosen experts of the last token, per layer."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    return [set(torch.topk(logits[-1], k).indices.tolist()) for logits in out.router_logits]


def test_batched_decode_routing_to_different_experts_equals_solo_runs(tiny_checkpoint,
                                                                      tiny_artifact):
    """Two sequences whose next tokens go to different experts, decoded in one batch, give
    each its solo logits (and transformers')."""
    model = hf_model(tiny_checkpoint("mixtral"))
    prompts, tokens = [PROMPT, [9, 4, 120, 33]], [17, 101]
    routes = [_routes(model, p + [t]) for p, t in zip(prompts, tokens, strict=True)]
    assert any(a != b for a, b in zip(*routes, strict=True))
    engine = fmc.load(tiny_artifact("mixtral"))
    solo = []
    for prompt, token in zip(prompts, tokens, strict=True):
        seq = engine.new_sequence()
        engine.prefill(seq, prompt)
        solo.append(engine.decode(seq, token))
        engine.remove(seq)
    batch = [engine.new_sequence() for _ in prompts]
    for seq, prompt in zip(batch, prompts, strict=True):
        engine.prefill(seq, prompt)
    together = engine.decode_batch(batch, tokens)
    for row, alone, prompt, token in zip(together, solo, prompts, tokens, strict=True):
        assert relative_error(row, alone) <= TOLERANCE
        assert relative_error(row, logits_of(model, prompt + [token])[-1]) <= TOLERANCE


def test_tensor_parallel_splits_every_experts_width(tiny_checkpoint, tiny_artifact, tmp_path):
    """--tensor-parallel 2: each rank holds half of every expert's width (gate/up rows,
    down columns), the router whole; logits equal the single-rank artifact's."""
    from fmc.runtime.engine import Engine

    out = tmp_path / "tp2"
    compile_model(CompileOptions(model=str(tiny_checkpoint("qwen3-moe")), output=out,
                                 tensor_parallel=2))
    manifest = json.loads((out / "manifest.json").read_text())
    params = {p["name"]: p for p in manifest["params"]}
    assert params["model.layers.0.mlp.experts.gate_proj.weight"]["shape"] == [4, 32, 64]
    assert params["model.layers.0.mlp.experts.gate_proj.weight"]["sharding"]["axis"] == 1
    assert params["model.layers.0.mlp.experts.down_proj.weight"]["sharding"]["axis"] == 2
    assert params["model.layers.0.mlp.gate.weight"]["sharding"]["axis"] is None
    whole, sharded = Engine(tiny_artifact("qwen3-moe")), Engine(out)
    a, b = whole.new_sequence(), sharded.new_sequence()
    np.testing.assert_allclose(sharded.prefill(b, PROMPT), whole.prefill(a, PROMPT),
                               atol=2e-5, rtol=1e-5)
    for token in (6, 8, 12):
        np.testing.assert_allclose(sharded.decode(b, token), whole.decode(a, token),
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("preset, total, active", [("mixtral-8x7b", 46.7e9, 12.9e9),
                                                   ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_presets_have_the_published_total_and_active_sizes(preset, total, active):
    """Mistral's and Qwen's model cards: 46.7B total / 12.9B active, 30.5B / 3.3B."""
    config = open_model(preset).config
    assert abs(config.param_count() - total) < 0.01 * total
    assert abs(config.param_count(active=True) - active) < 0.02 * active


def test_dry_run_counts_total_and_active_weights(tiny_checkpoint, capsys):
    """`--dry-run`: beside all the weights, those one token reads — its 2 of 4 experts per
    layer, everything else whole — and the parameter counts."""
    from fmc.cli import main
    from fmc.compiler import plan_compile
    from fmc.quant import experts, get

    checkpoint = tiny_checkpoint("mixtral")
    plan = plan_compile(CompileOptions(model=str(checkpoint), quant="q4f16"))
    memory, config = plan["memory"], open_model(str(checkpoint)).config
    assert plan["parameter_count"] == {"total": config.param_count(),
                                       "active": config.param_count(active=True)}
    h, width, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    stacked = [(4, width, h), (4, width, h), (4, h, width)] * layers  # w1, w3, w2
    expert_bytes = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
                       for shape in stacked for t in experts.storage(get("q4f16"), shape, "w"))
    assert memory["active_weights_bytes"] == memory["weights_bytes"] - expert_bytes // 2
    assert main(["compile", str(checkpoint), "-o", "unused", "--dry-run"]) == 0
    assert "mixture of experts: " in capsys.readouterr().out


def test_refused_and_broken_moe_inputs(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen3-moe"), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value, message in [
            ("mlp_only_layers", [1], r"'mlp_only_layers' \(dense layers among the experts\) "
                                     "is not supported for qwen3_moe"),
            ("decoder_sparse_step", 2, "'decoder_sparse_step' other than 1"),
            ("num_experts_per_tok", 5, r"num_experts_per_tok \(5\) exceeds the number of "
                                       r"experts \(4\)")]:
        (checkpoint / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(InputError, match=message):
            open_model(str(checkpoint))
    (checkpoint / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    state = load_file(str(checkpoint / "model.safetensors"))
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(state, str(checkpoint / "model.safetensors"))
    with pytest.raises(InputError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.2\.up_proj"
                                         r"\.weight' is missing from the checkpoint"):
        open_model(str(checkpoint))


def _write_moe_gguf(checkpoint, path, expert_type=None):
    """A tiny MoE checkpoint as llama.cpp's converter writes it: the per-expert tensors
    stacked into `ffn_*_exps` [experts, out, in], the router as `ffn_gate_inp`, the expert
    counts in the metadata. Mixtral is arch "llama" (Q/K rows permuted), Qwen3-MoE arch
    "qwen3moe" (expert width as `expert_feed_forward_length`, q/k norms, no permutation).
    `expert_type`: the GGML type of the expert tensors (None: F32)."""
    from models import add_gguf_tensor, finish_gguf, gguf_writer, permute_like_llama_cpp
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    mixtral = config["model_type"] == "mixtral"
    writer = gguf_writer(path, "llama" if mixtral else "qwen3moe", config)
    experts = _experts_of(config)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if not mixtral:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    moe = "block_sparse_moe" if mixtral else "mlp"
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             f"{moe}.gate": "ffn_gate_inp"}
    if not mixtral:
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    projections = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for module, gname in names.items():
            array = state[f"{prefix}{module}.weight"]
            if mixtral and gname in ("attn_q", "attn_k"):
                array = permute_like_llama_cpp(array, config["num_attention_heads"]
                                               if gname == "attn_q"
                                               else config["num_key_value_heads"])
            tensors[f"blk.{layer}.{gname}.weight"] = array
        for proj, gname in zip(projections, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
                               strict=True):
            tensors[f"blk.{layer}.{gname}.weight"] = np.stack(
                [state[f"{prefix}{moe}.experts.{e}.{proj}.weight"] for e in range(experts)])
    for name, array in tensors.items():
        add_gguf_tensor(writer, name, array,
                        expert_type if name.endswith("_exps.weight") else None)
    return finish_gguf(writer, path, config["vocab_size"])


@pytest.mark.parametrize("name, arch, down, expert_type", [
    ("mixtral", "mixtral", "block_sparse_moe.experts.w2", None),
    ("qwen3-moe", "qwen3_moe", "mlp.experts.down_proj", "Q8_0")])
def test_moe_gguf_matches_transformers(tiny_checkpoint, tmp_path, fmc_log, name, arch, down,
                                       expert_type):
    """A MoE GGUF as llama.cpp writes it (stacked `ffn_*_exps`, `ffn_gate_inp`, expert
    metadata; Mixtral as a "llama" file with experts) compiles to the checkpoint's logits.
    Q8_0 experts are kept as they are (`--quant gguf`, the default): their codes and scales
    imported without loss, the logits transformers' on the weights they hold."""
    import gguf

    checkpoint = tiny_checkpoint(name)
    qtype = getattr(gguf.GGMLQuantizationType, expert_type) if expert_type else None
    path = _write_moe_gguf(checkpoint, tmp_path / f"{name}.gguf", qtype)
    source = open_model(str(path))
    config = source.config
    width = config.intermediate_size
    assert (config.architecture, config.num_experts, config.num_experts_per_tok,
            config.norm_topk_prob, config.qk_norm) == (arch, 4, 2, True, arch == "qwen3_moe")
    assert source.weights.index()[f"model.layers.1.{down}.weight"].shape == (4, 64, width)
    out = tmp_path / "artifact"
    compile_model(CompileOptions(model=str(path), output=out))
    if expert_type is None:
        matches_prefill_and_decode(fmc.load(out), hf_model(checkpoint), steps=3)
        return
    assert "imported 6 tensor(s) losslessly from GGUF blocks" in fmc_log.text
    manifest = json.loads((out / "manifest.json").read_text())
    scheme = {p["source"]: p["scheme"] for p in manifest["params"] if p.get("source")}
    # Q8_0 blocks kept as q8f16, each expert row-interleaved as the CPU stores weights
    assert scheme[f"model.layers.1.{down}.weight"] == "q8f16_rows16"
    reference = _per_expert_checkpoint(out, checkpoint, tmp_path / "deq")
    from safetensors.numpy import load_file

    held, original = (load_file(str(d / "model.safetensors")) for d in (reference, checkpoint))
    for tensor in ("model.layers.0.mlp.experts.3.gate_proj.weight",
                   "model.layers.1.mlp.experts.1.down_proj.weight"):
        error = np.abs(held[tensor] - original[tensor]).max()
        assert 0 < error < 0.01 * np.abs(original[tensor]).max()
    matches_prefill_and_decode(fmc.load(out), hf_model(reference), steps=3)


def test_vulkan_build_equals_the_cpu_build(tiny_checkpoint, tiny_artifact, tmp_path):
    """The GPU path (dlight's schedules of the routing and gathered expert kernels, as for
    CUDA and Metal) run on Mesa's lavapipe: float32 logits equal the CPU build's to
    rounding, prefill and decode. Skipped only where this machine has no Vulkan driver."""
    from test_vulkan_runtime import why_no_vulkan

    if why_no_vulkan() is not None:
        pytest.skip(why_no_vulkan())
    out = tmp_path / "vulkan"
    compile_model(CompileOptions(model=str(tiny_checkpoint("mixtral")), output=out,
                                 target="vulkan"))
    gpu, cpu = fmc.load(out), fmc.load(tiny_artifact("mixtral"))
    assert relative_error(gpu.logits(PROMPT), cpu.logits(PROMPT)) <= TOLERANCE
    a, b = gpu.new_sequence(), cpu.new_sequence()
    assert relative_error(gpu.prefill(a, PROMPT), cpu.prefill(b, PROMPT)) <= TOLERANCE
    for token in (9, 31):
        assert relative_error(gpu.decode(a, token), cpu.decode(b, token)) <= TOLERANCE
