"""The runtime over TVM's paged KV cache: fork, pop, batched steps, save/restore, offload.

Every check compares against independent runs of the same engine (a fresh sequence fed the
same tokens through prefill and decode), so the KV management is what is being tested."""

from __future__ import annotations

import numpy as np
import pytest

import fmc
from fmc.errors import ArtifactError, UsageError

MODEL = "llama-gqa-untied"
TOLERANCE = 1e-5
PROMPT = [int(t) for t in np.random.default_rng(0).integers(2, 150, size=40)]


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return fmc.load(tiny_artifact(MODEL))


def independent(engine, prompt: list[int], steps: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each decode step, in a fresh sequence."""
    seq = engine.new_sequence()
    try:
        out = [engine.prefill(seq, prompt)]
        out += [engine.decode(seq, token) for token in steps]
        return out
    finally:
        engine.remove(seq)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= TOLERANCE * float(np.abs(b).max())


def test_fork_shares_the_prefix_pages_and_both_branches_match(engine):
    free = engine.available_pages()
    a = engine.new_sequence()
    engine.prefill(a, PROMPT)  # 40 tokens: 2 full pages of 16 and one partial
    used = free - engine.available_pages()
    assert used == 3
    b = engine.fork(a)
    assert free - engine.available_pages() <= used + 1  # at most the partial page copied
    assert engine.history[b] == PROMPT
    la, lb = engine.decode(a, 7), engine.decode(b, 9)
    assert close(la, independent(engine, PROMPT, [7])[1])
    assert close(lb, independent(engine, PROMPT, [9])[1])
    c = engine.fork(a, at=20)  # a prefix ending inside a page
    assert engine.history[c] == PROMPT[:20]
    assert close(engine.decode(c, 5), independent(engine, PROMPT[:20], [5])[1])
    for seq in (a, b, c):
        engine.remove(seq)
    assert engine.available_pages() == free


def test_batched_decode_of_four_lengths_equals_separate_runs(engine):
    prompts = [PROMPT[:n] for n in (3, 17, 29, 40)]
    seqs = [engine.new_sequence() for _ in prompts]
    first = engine.prefill_batch(seqs, prompts)
    steps = [[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]]
    batched = [first] + [engine.decode_batch(seqs, [s[i] for s in steps]) for i in range(3)]
    for row, (prompt, tokens) in enumerate(zip(prompts, steps, strict=True)):
        alone = independent(engine, prompt, tokens)
        for step in range(4):
            assert close(batched[step][row], alone[step]), (row, step)
    for seq in seqs:
        engine.remove(seq)


def test_pop_then_decode_equals_the_shorter_run(engine):
    seq = engine.new_sequence()
    engine.prefill(seq, PROMPT)
    engine.pop(seq, 3)
    assert engine.sequence_length(seq) == 37 and engine.history[seq] == PROMPT[:37]
    assert close(engine.decode(seq, 8), independent(engine, PROMPT[:37], [8])[1])
    with pytest.raises(UsageError, match="cannot pop 99"):
        engine.pop(seq, 99)
    engine.remove(seq)


def test_save_restore_in_a_fresh_engine_continues_exactly(engine, tiny_artifact, tmp_path):
    seq = engine.new_sequence()
    engine.prefill(seq, PROMPT)
    engine.decode(seq, 6)
    path = tmp_path / "a.fmcs"
    engine.save(seq, path, {"messages": [{"role": "user", "content": "hi"}]})
    expected = [engine.decode(seq, t) for t in (4, 5)]
    engine.remove(seq)

    fresh = fmc.load(tiny_artifact(MODEL))
    restored, extra = fresh.restore(path)
    assert extra == {"messages": [{"role": "user", "content": "hi"}]}
    assert fresh.history[restored] == [*PROMPT, 6]
    assert fresh.sequence_length(restored) == len(PROMPT) + 1
    for token, logits in zip((4, 5), expected, strict=True):
        np.testing.assert_array_equal(fresh.decode(restored, token), logits)


def test_a_session_from_another_artifact_is_refused(engine, tiny_artifact, tmp_path):
    seq = engine.new_sequence()
    engine.prefill(seq, PROMPT[:5])
    path = tmp_path / "a.fmcs"
    engine.save(seq, path)
    engine.remove(seq)
    other = fmc.load(tiny_artifact(MODEL, "q4f16"))
    with pytest.raises(ArtifactError, match="saved from another artifact"):
        other.restore(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ArtifactError):
        engine.restore(path)


def test_offload_frees_pages_and_bringing_back_continues_exactly(engine):
    free = engine.available_pages()
    seq = engine.new_sequence()
    engine.prefill(seq, PROMPT)
    in_use = engine.available_pages()
    engine.offload(seq)
    assert engine.available_pages() == free > in_use
    with pytest.raises(UsageError, match="offloaded"):
        engine.decode(seq, 3)
    expected = independent(engine, PROMPT, [3])[1]
    engine.bring_back(seq)  # alone in the cache: its pages are copied back
    assert engine.last_import == "copied" and engine.available_pages() == in_use
    assert engine.history[seq] == PROMPT
    assert close(engine.decode(seq, 3), expected)
    engine.offload(seq)
    other = engine.new_sequence()  # the freed pages serve another sequence meanwhile
    engine.prefill(other, PROMPT[::-1])
    engine.bring_back(seq)  # with another sequence live: recomputed from its tokens
    assert engine.last_import == "recomputed"
    assert engine.history[seq] == [*PROMPT, 3] and engine.sequence_length(seq) == 41
    assert close(engine.decode(seq, 4), independent(engine, PROMPT, [3, 4])[2])
    assert engine.history[other] == PROMPT[::-1]
    engine.remove(seq)
    engine.remove(other)
    assert engine.available_pages() == free


def test_concurrent_streams_share_decode_steps_and_match_single_runs(engine):
    import asyncio

    prompts = ["w5 w6 w7", "w9 w10 w11 w12 w13 w14", "w20"]
    alone = [engine.tokenizer.decode(list(engine.generate_ids(
        engine.tokenizer.encode(p), 12, stop_at_eos=False))) for p in prompts]

    async def collect(prompt):
        return "".join([piece async for piece in engine.stream(prompt, 12)])

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    engine._scheduler = None
    together = asyncio.run(main())
    sizes = engine._scheduler.batch_sizes
    assert together == alone  # (the tiny model's eos w1 is never the argmax here)
    assert sizes == [3] * 11  # 11 decode steps, each for all three requests
    assert engine.history == {}  # every sequence was released


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from fmc.runtime.sampling import penalize

    logits = np.random.default_rng(1).normal(size=64).astype(np.float32)
    history = [3, 7, 7, 20, 63]
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]),
                                                   torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_allclose(penalize(logits, history, 1.3), theirs, rtol=1e-6)


def test_top_k_samples_only_the_k_likeliest():
    from fmc.runtime.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=0))
    logits = np.linspace(0, 1, 10).astype(np.float32)
    assert {sampler(logits) for _ in range(300)} == {7, 8, 9}


def _frequencies(params, logits, draws=4000):
    from fmc.runtime.sampling import Sampler

    sampler = Sampler(params)
    counts = np.bincount([sampler(logits) for _ in range(draws)], minlength=len(logits))
    return counts / draws


def test_temperature_samples_the_softmax_of_logits_over_temperature():
    from fmc.runtime.sampling import SamplingParams

    logits = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    for temperature in (0.5, 1.0, 2.0):
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        seen = _frequencies(SamplingParams(temperature=temperature, seed=1), logits)
        # 4 standard errors of a frequency from 4000 draws
        assert np.all(np.abs(seen - expected) <= 4 * np.sqrt(expected * (1 - expected) / 4000))


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    from fmc.runtime.sampling import SamplingParams

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    seen = _frequencies(SamplingParams(temperature=1.0, top_p=0.7, seed=2), logits)
    assert seen[2] == seen[3] == 0  # 0.5 + 0.3 reaches 0.7: the nucleus is {0, 1}
    assert abs(seen[0] - 0.5 / 0.8) <= 4 * np.sqrt(0.625 * 0.375 / 4000)
    seen = _frequencies(SamplingParams(temperature=1.0, top_p=0.85, seed=3), logits)
    assert seen[3] == 0 and seen[2] > 0


def test_bench_batch_reports_aggregate_rates(engine):
    from fmc.runtime.bench import benchmark

    result = benchmark(engine, prompt_len=8, gen_len=4, runs=1, warmup=0, batch=4)
    assert result["batch"] == 4 and result["decode_tokens_per_s"]["median"] > 0
    assert engine.history == {}
    with pytest.raises(UsageError, match="--batch must be in 1..8"):
        benchmark(engine, batch=9)


def test_only_the_paged_cache_calls_the_kv_cache_builtins():
    """Engine, sessions, chat and the scheduler go through fmc.runtime.kv_cache.PagedCache:
    no other module names a `kv_state_*` / `attention_kv_cache_*` builtin (DiscoRanks lists
    those whose results it reads back from the workers)."""
    import ast
    from pathlib import Path

    root = Path(fmc.__file__).parent
    allowed = {"runtime/kv_cache.py", "runtime/tensor_parallel.py"}
    found = [f"{path.relative_to(root)}:{node.lineno}" for path in sorted(root.rglob("*.py"))
             if str(path.relative_to(root)) not in allowed
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and
             node.value.startswith(("vm.builtin.kv_state_", "vm.builtin.attention_kv_cache_"))]
    assert found == []


def test_loading_chooses_the_device_from_the_manifest(tiny_artifact):
    """The device comes from the manifest's device kind: loading and generating never
    import the compile-time target registry (every target plugin and its tools)."""
    import subprocess
    import sys

    code = ("import sys, fmc; e = fmc.load(sys.argv[1]); e.logits([1, 2, 3]); "
            "print(e.artifact.device, 'fmc.targets.registry' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_artifact(MODEL))], check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["cpu:0", "False"]
