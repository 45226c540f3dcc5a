"""Measure an artifact: prefill and decode tokens/s (median of runs after warm-up), time to
first token, peak memory. Measurements only; no timed unit tests anywhere in fmc."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from fmc.errors import UsageError


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark(engine, prompt_len: int = 128, gen_len: int = 64, runs: int = 5,
              warmup: int = 1, seed: int = 0, batch: int = 1) -> dict:
    """One sequence at a time: prefill `prompt_len` random tokens, then `gen_len` greedy
    decode steps (logits copied to the host each step, as in real generation). With
    `batch` > 1, that many sequences are prefilled together and decoded in batched steps;
    tokens/s are then aggregate (all sequences)."""
    if prompt_len <= 0 or gen_len <= 0 or runs <= 0 or warmup < 0:
        raise UsageError("--prompt-len, --gen-len and --runs must be positive")
    if not 1 <= batch <= engine.max_batch_size:
        raise UsageError(f"--batch must be in 1..{engine.max_batch_size}")
    if batch > 1:
        return _batched(engine, prompt_len, gen_len, runs, warmup, seed, batch)
    if prompt_len + gen_len > engine.context_window:
        raise UsageError(f"prompt-len + gen-len ({prompt_len + gen_len}) exceeds the context "
                         f"window ({engine.context_window})")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, engine.config.vocab_size, prompt_len).tolist()
    prefill_tps, decode_tps, ttft = [], [], []
    for run in range(warmup + runs):
        seq = engine.new_sequence()
        try:
            start = time.perf_counter()
            logits = engine.prefill(seq, prompt)
            token = int(np.argmax(logits))
            first = time.perf_counter()
            for _ in range(gen_len):
                token = int(np.argmax(engine.decode(seq, token)))
            end = time.perf_counter()
        finally:
            engine.remove(seq)
        if run >= warmup:
            ttft.append(first - start)
            prefill_tps.append(prompt_len / (first - start))
            decode_tps.append(gen_len / (end - first))
    return {
        "prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "warmup": warmup,
        "prefill_tokens_per_s": _summary(prefill_tps),
        "decode_tokens_per_s": _summary(decode_tps),
        "batch": 1, "time_to_first_token_s": _summary(ttft),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _batched(engine, prompt_len: int, gen_len: int, runs: int, warmup: int, seed: int,
             batch: int) -> dict:
    if (prompt_len + gen_len) * batch > engine.context_window:
        raise UsageError(f"{batch} sequences of {prompt_len + gen_len} tokens exceed the "
                         f"context window ({engine.context_window} tokens in total)")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, engine.config.vocab_size, prompt_len).tolist()
               for _ in range(batch)]
    prefill_tps, decode_tps = [], []
    for run in range(warmup + runs):
        seqs = [engine.new_sequence() for _ in range(batch)]
        try:
            start = time.perf_counter()
            tokens = np.argmax(engine.prefill_batch(seqs, prompts), axis=1).tolist()
            first = time.perf_counter()
            for _ in range(gen_len):
                tokens = np.argmax(engine.decode_batch(seqs, tokens), axis=1).tolist()
            end = time.perf_counter()
        finally:
            for seq in seqs:
                engine.remove(seq)
        if run >= warmup:
            prefill_tps.append(batch * prompt_len / (first - start))
            decode_tps.append(batch * gen_len / (end - first))
    return {
        "prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "warmup": warmup,
        "batch": batch, "prefill_tokens_per_s": _summary(prefill_tps),
        "decode_tokens_per_s": _summary(decode_tps),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
