"""Tensor-parallel sharding of checkpoints (the data side of issue #10)."""

from __future__ import annotations

import numpy as np
import pytest

from fmc.errors import UsageError
from fmc.frontend.source import open_model
from fmc.frontend.tensor_parallel import (
    ShardedWeights,
    check_divisible,
    local_config,
    sharding_of,
    unshard,
)


@pytest.mark.parametrize("name, ranks", [("llama-gqa-untied", 2), ("qwen2-bias", 2),
                                         ("llama-mha", 4)])
def test_rank_shards_concatenate_back_to_the_checkpoint(tiny_checkpoint, name, ranks):
    source = open_model(str(tiny_checkpoint(name)))
    full = source.weights
    views = [ShardedWeights(full, rank, ranks) for rank in range(ranks)]
    for tensor in full.index():
        parts = [view.load(tensor) for view in views]
        assert all(p.shape == views[0].index()[tensor].shape for p in parts)
        np.testing.assert_array_equal(unshard(parts, sharding_of(tensor)), full.load(tensor))


@pytest.mark.parametrize("name, ranks", [("llama-gqa-untied", 2), ("qwen2-bias", 2),
                                         ("qwen3-bias", 2)])
def test_local_shapes_are_the_local_models_parameters(tiny_checkpoint, name, ranks):
    """What a rank loads is exactly what the model of `local_config` expects."""
    from fmc.frontend.llama_model import LlamaForCausalLM
    from fmc.quant.convert import check_source

    source = open_model(str(tiny_checkpoint(name)))
    model = LlamaForCausalLM(local_config(source.config, ranks), "float32", None)
    expected = {n: tuple(int(d) for d in p.shape) for n, p in model.named_parameters()}
    for rank in range(ranks):
        assert check_source(ShardedWeights(source.weights, rank, ranks), expected) == []


def test_partial_outputs_of_the_ranks_sum_to_the_full_layer(tiny_checkpoint):
    """The algebra the sharded model relies on, in float64 numpy: per-rank attention over
    its own heads (GQA) followed by its block of o_proj, and per-rank MLP slices followed by
    their block of down_proj, sum to the unsharded layer."""
    source = open_model(str(tiny_checkpoint("llama-gqa-untied")))
    config, ranks = source.config, 2
    x = np.random.default_rng(0).normal(size=(5, config.hidden_size))

    def weights(view, name):
        return view.load(f"model.layers.0.{name}.weight").astype(np.float64)

    def attention(view, heads, kv_heads):
        d = config.head_dim
        q = (x @ weights(view, "self_attn.q_proj").T).reshape(5, heads, d)
        k = (x @ weights(view, "self_attn.k_proj").T).reshape(5, kv_heads, d)
        v = (x @ weights(view, "self_attn.v_proj").T).reshape(5, kv_heads, d)
        group = heads // kv_heads
        mask = np.triu(np.full((5, 5), -np.inf), 1)
        out = np.empty_like(q)
        for h in range(heads):
            scores = q[:, h] @ k[:, h // group].T / np.sqrt(d) + mask
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group]
        return out.reshape(5, heads * d) @ weights(view, "self_attn.o_proj").T

    def mlp(view):
        gate, up = x @ weights(view, "mlp.gate_proj").T, x @ weights(view, "mlp.up_proj").T
        return (gate / (1 + np.exp(-gate)) * up) @ weights(view, "mlp.down_proj").T

    local = local_config(config, ranks)
    views = [ShardedWeights(source.weights, r, ranks) for r in range(ranks)]
    full = source.weights
    np.testing.assert_allclose(
        sum(attention(v, local.num_attention_heads, local.num_key_value_heads) for v in views),
        attention(full, config.num_attention_heads, config.num_key_value_heads), rtol=1e-10)
    np.testing.assert_allclose(sum(mlp(v) for v in views), mlp(full), rtol=1e-10)


def test_a_row_parallel_bias_is_added_once():
    sharding = sharding_of("model.layers.3.self_attn.o_proj.bias")
    assert sharding.rank0_only
    assert sharding_of("model.layers.3.self_attn.q_proj.bias").axis == 0
    assert sharding_of("model.norm.weight").axis is None
    assert sharding_of("model.layers.0.mlp.down_proj.weight").axis == 1


def test_splits_that_do_not_divide_name_the_key(tiny_checkpoint):
    config = open_model(str(tiny_checkpoint("llama-gqa-untied"))).config  # 4 heads, 2 KV, 96
    with pytest.raises(UsageError, match=r"does not divide num_attention_heads \(4\)"):
        check_divisible(config, 3)
    with pytest.raises(UsageError, match=r"does not divide num_key_value_heads \(2\)"):
        check_divisible(config, 4)
    with pytest.raises(UsageError, match="must be ≥ 1"):
        check_divisible(config, 0)


# -- the sharded artifact, end to end -----------------------------------------------------
@pytest.fixture(scope="module")
def tp_artifact(tiny_checkpoint, tiny_artifact, tmp_path_factory):
    """(name, quant, ranks) → artifact compiled with --tensor-parallel ranks."""
    from fmc.compiler import CompileOptions, compile_model

    built = {}

    def get(name: str, quant: str, ranks: int):
        if ranks == 1:
            return tiny_artifact(name, quant)
        if (name, quant, ranks) not in built:
            out = tmp_path_factory.mktemp("tp") / f"{name}-{quant}-tp{ranks}"
            compile_model(CompileOptions(model=str(tiny_checkpoint(name)), output=out,
                                         quant=quant, tensor_parallel=ranks))
            built[name, quant, ranks] = out
        return built[name, quant, ranks]

    return get


CASES = [("llama-gqa-untied", "q0f32", 2), ("llama-gqa-wide", "q0f32", 2),
         ("llama-gqa-wide", "q0f32", 4), ("llama-mha", "q0f32", 4), ("qwen2-bias", "q0f32", 2),
         ("llama-quant", "q4f16", 2),
         # per-head q/k norms (replicated), q/k/v/o biases, head_dim ≠ hidden / heads
         ("qwen3-bias", "q0f32", 2)]


@pytest.mark.parametrize("name, quant, ranks", CASES)
def test_sharded_logits_equal_the_unsharded_model(tp_artifact, name, quant, ranks):
    """The local-view program on `ranks` threads with fmc's all-reduce computes the logits of
    the unsharded artifact: prefill, decode, and a batched step over two sequences."""
    from fmc.runtime.engine import Engine

    whole, sharded = Engine(tp_artifact(name, quant, 1)), Engine(tp_artifact(name, quant, ranks))
    assert (whole.ranks, sharded.ranks) == (1, ranks)
    layers = whole.config.num_hidden_layers
    prompts = [[1, 5, 7, 9, 20, 33, 2, 11], [3, 4, 40]]

    def close(a, b):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)

    a = [whole.new_sequence() for _ in prompts]
    b = [sharded.new_sequence() for _ in prompts]
    for prompt, sa, sb in zip(prompts, a, b, strict=True):
        calls = sharded._vm.collectives.allreduce_calls
        close(whole.prefill(sa, prompt), sharded.prefill(sb, prompt))
        # one step: an all-reduce after attention and one after the MLP, per layer
        assert sharded._vm.collectives.allreduce_calls - calls == 2 * layers
    for token in (6, 8, 12):
        close(whole.decode(a[0], token), sharded.decode(b[0], token))
    close(whole.decode_batch(a, [13, 14]), sharded.decode_batch(b, [13, 14]))
    # fork and pop go to every rank's cache
    fa, fb = whole.fork(a[0], at=5), sharded.fork(b[0], at=5)
    close(whole.decode(fa, 15), sharded.decode(fb, 15))
    whole.pop(a[1], 2)
    sharded.pop(b[1], 2)
    assert sharded.sequence_length(b[1]) == whole.sequence_length(a[1]) == 2
    close(whole.decode(a[1], 16), sharded.decode(b[1], 16))
    assert sharded.available_pages() == whole.available_pages()


@pytest.mark.parametrize("name, quant, ranks", [("llama-gqa-wide", "q0f32", 4),
                                                ("llama-quant", "q4f16", 2)])
def test_rank_shards_concatenate_to_the_unsharded_artifacts_tensors(tp_artifact, name, quant,
                                                                    ranks):
    """Every stored tensor (quantized codes, scales, fused q/k/v and gate/up, CPU
    row-interleaved layout) rebuilt from the per-rank shards along the manifest's recorded
    sharding is bit-identical to the unsharded artifact's."""
    from safetensors.numpy import load_file

    from fmc.artifacts.manifest import read_manifest
    from fmc.frontend.tensor_parallel import unshard_stored

    whole_dir, sharded_dir = tp_artifact(name, quant, 1), tp_artifact(name, quant, ranks)
    whole = {e.name: load_file(whole_dir / e.stored.shard)[e.name]
             for e in read_manifest(whole_dir).params}
    manifest = read_manifest(sharded_dir)
    assert manifest.tensor_parallel.ranks == ranks
    files = {}
    kinds = set()
    for entry in manifest.params:
        assert [r.shard.split("/")[1] for r in entry.ranks] == \
            [f"rank-{r}" for r in range(ranks)]
        parts = []
        for location in entry.ranks:
            if location.shard not in files:
                files[location.shard] = load_file(sharded_dir / location.shard)
            parts.append(files[location.shard][entry.name])
        assert all(tuple(p.shape) == entry.shape for p in parts)
        rebuilt = unshard_stored(entry, parts)
        assert rebuilt is not None, entry.name
        np.testing.assert_array_equal(rebuilt, whole[entry.name], err_msg=entry.name)
        kinds.add((entry.sharding["axis"], entry.sharding.get("stacked", False)))
    assert kinds == {(None, False), (0, True), (1, False)}  # replicated, fused rows, columns


def test_rank_shards_concatenate_to_the_checkpoint(tp_artifact, tiny_checkpoint):
    """Unquantized: the rebuilt tensors are the checkpoint's (fused ones: their members)."""
    from safetensors.numpy import load_file

    from fmc.artifacts.manifest import read_manifest
    from fmc.frontend.tensor_parallel import unshard_stored

    directory = tp_artifact("llama-gqa-wide", "q0f32", 4)
    checkpoint = open_model(str(tiny_checkpoint("llama-gqa-wide"))).weights
    for entry in read_manifest(directory).params:
        parts = [load_file(directory / r.shard)[entry.name] for r in entry.ranks]
        sources = [m.source for m in entry.fused_from or ()] or [entry.source]
        expected = np.concatenate([checkpoint.load(s) for s in sources], axis=0)
        np.testing.assert_array_equal(unshard_stored(entry, parts), expected)


def test_cli_reports_ranks_and_runs_the_sharded_artifact(tp_artifact, tiny_checkpoint,
                                                         tmp_path):
    """compile --dry-run and inspect give per-rank bytes; verify checks every rank; run
    generates the unsharded artifact's tokens; a damaged rank shard is named."""
    import json
    import subprocess
    import sys

    def fmc(*args, check=True):
        run = subprocess.run([sys.executable, "-m", "fmc", "--quiet", *args],
                             capture_output=True, text=True)
        assert not check or run.returncode == 0, run.stderr
        return run

    checkpoint = str(tiny_checkpoint("llama-gqa-wide"))
    whole = tp_artifact("llama-gqa-wide", "q0f32", 1)
    sharded = tp_artifact("llama-gqa-wide", "q0f32", 4)
    plan = json.loads(fmc("compile", checkpoint, "--tp", "4", "-o", str(tmp_path / "x"),
                          "--dry-run", "--json").stdout)
    single = json.loads(fmc("compile", checkpoint, "-o", str(tmp_path / "x"),
                            "--dry-run", "--json").stdout)
    assert plan["memory"]["ranks"] == 4
    assert plan["memory"]["kv_cache_bytes"] * 4 == single["memory"]["kv_cache_bytes"]
    assert plan["tensor_parallel"]["collectives"]["allreduce_sum_per_step"] == 4
    assert "params/rank-3/shard-00000.safetensors" in plan["files"]
    assert not (tmp_path / "x").exists()

    info = json.loads(fmc("inspect", str(sharded), "--json").stdout)["tensor_parallel"]
    shards = [sharded / f"params/rank-{r}/shard-00000.safetensors" for r in range(4)]
    from safetensors.numpy import load_file
    assert info["weight_bytes_per_rank"] == [sum(a.nbytes for a in load_file(s).values())
                                             for s in shards]
    assert info["heads_per_rank"] == "2 q / 1 kv"
    assert info["kv_cache_bytes_per_rank"] == plan["memory"]["kv_cache_bytes"]

    assert "on each of 4 ranks" in fmc("verify", str(sharded)).stdout
    args = ["--prompt", "w3 w4 w5", "--max-tokens", "8", "--ignore-eos", "--json"]
    tokens = [json.loads(fmc("run", str(a), *args).stdout)["token_ids"] for a in (whole, sharded)]
    assert tokens[0] == tokens[1]

    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree(sharded, damaged)
    shard = damaged / "params/rank-2/shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = fmc("run", str(damaged), *args, check=False)
    assert run.returncode == 5
    assert "params/rank-2/shard-00000.safetensors: sha256 mismatch" in run.stderr


def test_save_restore_and_offload_move_every_ranks_pages(tp_artifact, tmp_path):
    """Each rank's KV pages (its own heads) are exported by its worker and imported back by
    the same rank: a restored sequence continues exactly as the saved one does, a
    brought-back one as one never interrupted; offloading frees the pages on every rank."""
    from fmc.runtime.engine import Engine

    artifact = tp_artifact("llama-gqa-wide", "q0f32", 2)
    prompt = list(range(3, 40))  # 37 tokens: three pages of 16
    reference = Engine(artifact)
    uninterrupted = reference.new_sequence()
    reference.prefill(uninterrupted, prompt)

    engine = Engine(artifact)
    seq = engine.new_sequence()
    engine.prefill(seq, prompt)
    engine.save(seq, tmp_path / "s.fmcs", {"note": "tp"})
    expected = engine.decode(seq, 5)
    restored = Engine(artifact)
    again, extra = restored.restore(tmp_path / "s.fmcs")
    assert (restored.last_import, extra) == ("copied", {"note": "tp"})
    np.testing.assert_array_equal(restored.decode(again, 5), expected)

    def close(a, b):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)

    close(expected, reference.decode(uninterrupted, 5))
    free = engine.available_pages()
    engine.offload(seq)
    assert engine.available_pages() - free == 3
    engine.bring_back(seq)
    assert engine.last_import == "copied" and engine.available_pages() == free
    close(engine.decode(seq, 6), reference.decode(uninterrupted, 6))

    other = engine.new_sequence()  # with another live sequence the pages are recomputed
    engine.prefill(other, [1, 2])
    engine.offload(seq)
    engine.bring_back(seq)
    assert engine.last_import == "recomputed"
    close(engine.decode(seq, 7), reference.decode(uninterrupted, 7))


def test_the_documented_disco_loading_code_runs(tp_artifact):
    """examples/disco_generate.py (the loading code of docs/targets.md: a Disco session, the
    library on every worker, each worker loading its rank's weights, KV-cache calls through
    the session) decodes the unsharded model's greedy tokens on 4 CPU ranks."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fmc.runtime.engine import Engine

    prompt = [1, 5, 7, 9]
    engine = Engine(tp_artifact("llama-gqa-wide", "q0f32", 1))
    seq = engine.new_sequence()
    expected = [int(np.argmax(engine.prefill(seq, prompt)))]
    while len(expected) < 8:
        expected.append(int(np.argmax(engine.decode(seq, expected[-1]))))
    script = Path(__file__).parent.parent / "examples" / "disco_generate.py"
    run = subprocess.run([sys.executable, str(script), str(tp_artifact("llama-gqa-wide",
                                                                        "q0f32", 4)),
                          "--tokens", *map(str, prompt), "--new", "8", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == expected


def test_closing_a_session_waits_for_busy_workers(tmp_path):
    """close_session (what the example and the engine end with) waits for every worker:
    a process that shuts a session down while a worker is still busy aborts at exit."""
    import subprocess
    import sys

    script = tmp_path / "busy_workers.py"
    script.write_text(
        "import time, tvm_ffi\n"
        "from fmc.runtime import tensor_parallel\n"
        "disco = tensor_parallel.disco_session_module()\n"
        "tvm_ffi.register_global_func('fmc.test.nap', lambda: time.sleep(0.5), override=True)\n"
        "session = disco.ThreadedSession(num_workers=2)\n"
        "session.call_packed(session.get_global_func('fmc.test.nap'))\n"
        "tensor_parallel.close_session(session)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_processes_with_sharded_engines_exit_cleanly(tp_artifact, tmp_path):
    """Disco workers still busy when a process ends abort it (exit 134): an error right
    after loading (a prompt longer than the context) and a script that ends with a live
    engine both exit with their own code."""
    import subprocess
    import sys

    artifact = tp_artifact("llama-gqa-untied", "q0f32", 2)
    prompt = " ".join(f"w{i}" for i in range(40))
    run = subprocess.run([sys.executable, "-m", "fmc", "run", str(artifact), "--prompt",
                          prompt, "--context-window", "16"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert "the context window holds 16" in run.stderr
    script = (f"import fmc; e = fmc.load({str(artifact)!r}); s = e.new_sequence(); "
              "e.prefill(s, [1, 2, 3])")
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0 and "terminate" not in run.stderr, run.stderr
