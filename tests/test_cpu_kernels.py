"""fmc's hand-written CPU kernels against the TVM kernels they replace, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

from fmc.lowering.kernels.attention import DECODE_SYMBOL, decode_attention
from fmc.targets.cpu import host_cpu

PAGE = 16


def _paged_batch(rng, lengths, kv_heads, heads, head_dim):
    """A page pool with each sequence's pages scattered in it, plus the cache's aux arrays."""
    pages_per_seq = [(n + PAGE - 1) // PAGE for n in lengths]
    used = sum(pages_per_seq)
    pool = rng.standard_normal((used + 3, 2, kv_heads, PAGE, head_dim)).astype("float32")
    values = rng.permutation(used + 3)[:used].astype("int32")
    indptr = np.concatenate([[0], np.cumsum(pages_per_seq)]).astype("int32")
    last_page_len = np.array([n - (p - 1) * PAGE if p else 0
                              for n, p in zip(lengths, pages_per_seq, strict=True)], "int32")
    q = rng.standard_normal((len(lengths), heads, head_dim)).astype("float32")
    positions = np.array(lengths, "int32")
    return q, pool, indptr, values, last_page_len, np.zeros(len(lengths), "int32"), positions


def _run(executable, inputs, heads, head_dim):
    device = tvm.cpu()
    batch = len(inputs[0])
    out = tvm.runtime.tensor(np.zeros((batch, heads, head_dim), "float32"), device)
    lse = tvm.runtime.tensor(np.zeros((batch, heads), "float32"), device)
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    executable.mod[DECODE_SYMBOL](*args, out, lse, 0, 1.0, 10000.0, head_dim ** -0.5)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("kv_heads,heads,head_dim", [(3, 9, 64), (2, 2, 32), (1, 4, 48)])
def test_decode_attention_equals_tvm(kv_heads, heads, head_dim):
    # Lengths cover an empty sequence, one token, a full page, a page and one, many pages.
    lengths = [136, 1, 16, 17, 0, 40]
    inputs = _paged_batch(np.random.default_rng(kv_heads * 100 + head_dim), lengths,
                          kv_heads, heads, head_dim)
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})
    ours = tvm.compile(decode_attention(kv_heads, heads, head_dim, "float32"), target)
    reference = tvm.compile(_attention_decode_cpu(kv_heads, heads, head_dim, "float32", False,
                                                  {}), target)
    out, lse = _run(ours, inputs, heads, head_dim)
    want_out, want_lse = _run(reference, inputs, heads, head_dim)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert np.abs(out[0]).max() > 0.01  # not trivially zero


def test_decode_attention_refuses_inline_rope():
    inputs = _paged_batch(np.random.default_rng(0), [5], 1, 1, 16)
    executable = tvm.compile(decode_attention(1, 1, 16, "float32"),
                             tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()}))
    device = tvm.cpu()
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    out = tvm.runtime.tensor(np.zeros((1, 1, 16), "float32"), device)
    lse = tvm.runtime.tensor(np.zeros((1, 1), "float32"), device)
    with pytest.raises(Exception, match="RoPE applied at append"):
        executable.mod[DECODE_SYMBOL](*args, out, lse, 1, 1.0, 10000.0, 0.25)


def _ragged_batch(rng, q_lengths, kv_lengths, kv_heads, heads, head_dim):
    q_indptr = np.concatenate([[0], np.cumsum(q_lengths)]).astype("int32")
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lengths)]).astype("int32")
    q = rng.standard_normal((q_indptr[-1], heads, head_dim)).astype("float32")
    k = rng.standard_normal((kv_indptr[-1], kv_heads, head_dim)).astype("float32")
    v = rng.standard_normal((kv_indptr[-1], kv_heads, head_dim)).astype("float32")
    positions = np.zeros(q_indptr[-1], "int32")
    return q, q_indptr, k, v, kv_indptr, positions, np.zeros(len(q_lengths), "int32")


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("kv_heads,heads,head_dim", [(3, 9, 64), (2, 2, 32)])
def test_ragged_prefill_attention_equals_tvm(kv_heads, heads, head_dim, causal):
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from fmc.lowering.kernels.attention import (
        RAGGED_PREFILL_SYMBOL,
        ragged_prefill_attention,
    )

    # Sequences: a long prompt, one token, and one with more keys than queries (a chunk).
    inputs = _ragged_batch(np.random.default_rng(heads), [37, 1, 5], [37, 1, 21],
                           kv_heads, heads, head_dim)
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})
    results = []
    for func in (ragged_prefill_attention(kv_heads, heads, head_dim, "float32"),
                 _attention_prefill_ragged_cpu(kv_heads, heads, head_dim, head_dim,
                                               "float32", {})):
        executable = tvm.compile(func.with_attr("global_symbol", RAGGED_PREFILL_SYMBOL),
                                 target)
        device = tvm.cpu()
        total = len(inputs[0])
        out = tvm.runtime.tensor(np.zeros((total, heads, head_dim), "float32"), device)
        lse = tvm.runtime.tensor(np.zeros((total, heads), "float32"), device)
        executable.mod[RAGGED_PREFILL_SYMBOL](
            *[tvm.runtime.tensor(a, device) for a in inputs], out, lse, causal, 0, 1.0,
            10000.0, head_dim ** -0.5)
        results.append((out.numpy(), lse.numpy()))
    (out, lse), (want_out, want_lse) = results
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vector_lanes", [1, 16])
def test_fast_exp_is_within_two_ulp_over_the_float32_range(vector_lanes):
    from tvm import s_tir, te, tirx

    from fmc.targets import fast_exp

    xs = np.concatenate([np.linspace(-87.0, 88.0, 400_000), [0.0, -0.0, 1e-30, -100.0,
                                                              100.0]]).astype("float32")
    xs = np.resize(xs, (len(xs) + 15) // 16 * 16)
    x = te.placeholder(xs.shape, "float32")
    y = te.compute(xs.shape, lambda i: tirx.exp(x[i]))
    func = te.create_prim_func([x, y])
    if vector_lanes > 1:
        schedule = s_tir.Schedule(func)
        (loop,) = schedule.get_loops(schedule.get_sblock("compute"))
        schedule.vectorize(schedule.split(loop, [None, vector_lanes])[1])
        func = schedule.mod["main"]
    with fast_exp.lowering():
        kernel = tvm.compile(func, tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()}))
    out = tvm.runtime.tensor(np.zeros_like(xs))
    kernel(tvm.runtime.tensor(xs), out)
    got, want = out.numpy().astype(np.float64), np.exp(np.clip(xs, -88.3762626647949,
                                                               88.3762626647949).astype(np.float64))
    assert np.all(np.isfinite(got))
    normal = want >= np.finfo(np.float32).tiny  # below: flushed to 0 (documented)
    assert (np.abs(got - want) / want)[normal].max() < 2 * 2.0 ** -23
    assert np.all(got[~normal] <= np.finfo(np.float32).tiny)


def test_rescheduled_rope_equals_tvms():
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    from fmc.lowering.passes.cpu_attention import _rope

    original = llama_rope_with_position_map(10000.0, 1.0, 32, 4, 2, "float32", {}, 32)
    scheduled = _rope(original, 16)
    assert scheduled is not None and "T.parallel" in scheduled.script()
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((7, 8, 32)).astype("float32")
    positions = np.array([0, 1, 2, 50, 51, 52, 900], "int32")
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})
    results = []
    for func in (scheduled, original):
        outs = [tvm.runtime.tensor(np.zeros((7, n, 32), "float32")) for n in (4, 2, 2)]
        tvm.compile(func, target)(tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions),
                                  *outs, 1)
        results.append([o.numpy() for o in outs])
    for got, want in zip(*results, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(results[0][0][3], qkv[3, :4])  # RoPE did rotate


def _reference_paged_prefill(q, q_indptr, pool, page_indptr, values, last_page_len, causal,
                             group, scale):
    """Attention of each new token to its sequence's cached positions, in float64."""
    out = np.zeros(q.shape)
    lse = np.zeros(q.shape[:2])
    for b in range(len(q_indptr) - 1):
        pages = values[page_indptr[b]:page_indptr[b + 1]]
        kv_len = (len(pages) - 1) * PAGE + last_page_len[b] if len(pages) else 0
        k = np.concatenate([pool[p, 0] for p in pages], axis=1)[:, :kv_len] if kv_len else None
        v = np.concatenate([pool[p, 1] for p in pages], axis=1)[:, :kv_len] if kv_len else None
        count = q_indptr[b + 1] - q_indptr[b]
        for row in range(count):
            visible = min(kv_len - count + row + 1, kv_len) if causal else kv_len
            for h in range(q.shape[1]):
                if visible <= 0:
                    continue
                s = k[h // group, :visible] @ q[q_indptr[b] + row, h].astype(np.float64) * scale
                w = np.exp(s - s.max())
                out[q_indptr[b] + row, h] = w @ v[h // group, :visible] / w.sum()
                lse[q_indptr[b] + row, h] = (s.max() + np.log(w.sum())) / np.log(2)
    return out, lse


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_attention_equals_a_reference(causal):
    from fmc.lowering.kernels.attention import PAGED_PREFILL_SYMBOL, paged_prefill_attention

    kv_heads, heads, head_dim = 3, 9, 64
    rng = np.random.default_rng(causal)
    # Cached lengths 40 (3 pages, last partial), 16 (one full page), 1; new tokens 5, 16, 1.
    cached, new = [40, 16, 1], [5, 16, 1]
    _, pool, page_indptr, values, last_page_len, rope_offsets, _ = _paged_batch(
        rng, cached, kv_heads, heads, head_dim)
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype("int32")
    q = rng.standard_normal((q_indptr[-1], heads, head_dim)).astype("float32")
    kernel = tvm.compile(paged_prefill_attention(kv_heads, heads, head_dim, "float32"),
                         tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()}))
    out = tvm.runtime.tensor(np.zeros(q.shape, "float32"))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], "float32"))
    args = [q, q_indptr, pool, page_indptr, values, last_page_len, rope_offsets,
            np.zeros(len(q), "int32")]
    kernel.mod[PAGED_PREFILL_SYMBOL](*[tvm.runtime.tensor(a) for a in args], out, lse, causal,
                                     0, 1.0, 10000.0, head_dim ** -0.5)
    want_out, want_lse = _reference_paged_prefill(q, q_indptr, pool, page_indptr, values,
                                                  last_page_len, causal, heads // kv_heads,
                                                  head_dim ** -0.5)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-4, atol=1e-4)
