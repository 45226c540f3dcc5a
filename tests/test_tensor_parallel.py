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


@pytest.mark.parametrize("name, ranks", [("llama-gqa-untied", 2), ("qwen2-bias", 2)])
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
