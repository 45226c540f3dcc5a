"""Perplexity over a text with llama.cpp's protocol, so the two engines are comparable.

The token stream is cut into non-overlapping windows of `context` tokens; each window is
evaluated from scratch and only its second half is scored (every scored token has at least
context/2 tokens of history), exactly as `llama-perplexity -c N` does. Given a base engine
(the same model unquantized), it also reports the KL divergence of the model's next-token
distributions from the base's over the same scored positions, and how often both pick the
same top token — as `llama-perplexity --kl-divergence` does."""

from __future__ import annotations

import math
import time

import numpy as np

from fmc.errors import UsageError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities of float logits, computed in float64."""
    rows = logits.astype(np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    return rows - (np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)) + peak)


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of float logits, computed in float64."""
    return log_softmax(logits)[np.arange(len(targets)), targets]


def kl_divergence(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(base ‖ model) per row, in nats."""
    base = log_softmax(base_logits)
    return (np.exp(base) * (base - log_softmax(logits))).sum(axis=-1)


def decoded_logits(engine, window: list[int], first: int) -> np.ndarray:
    """Logits at positions first … len(window) − 2, each from its own decode step after a
    prefill of window[:first]: the kernels generation runs (which may differ from prefill's,
    e.g. the CPU's integer-dot decode GEMVs)."""
    seq = engine.new_sequence()
    try:
        engine.prefill(seq, window[:first])
        return np.stack([engine.decode(seq, token) for token in window[first:-1]])
    finally:
        engine.remove(seq)


def perplexity(engine, tokens: list[int], context: int = 512, max_chunks: int | None = None,
               bos_token: int | None = None, progress=None, base=None,
               decode: bool = False) -> dict:
    """Returns {"perplexity", "chunks", "scored_tokens", "tokens", "seconds"}; with a `base`
    engine also "kl_divergence" (mean over scored tokens, nats, with its standard error),
    "same_top_token" (fraction) and "base_perplexity". With `decode`, the engine's scored
    logits come from decode steps instead of one prefill per window (the base's always come
    from prefill)."""
    if context < 4:
        raise UsageError(f"--context must be at least 4, got {context}")
    chunks = len(tokens) // context
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    if chunks == 0:
        raise UsageError(f"the text has {len(tokens)} tokens, fewer than one window of "
                         f"{context}")
    first = context // 2
    total_nll, scored = 0.0, 0
    base_nll, divergences, same_top = 0.0, [], 0
    start_time = time.perf_counter()
    for index in range(chunks):
        window = list(tokens[index * context:(index + 1) * context])
        if bos_token is not None:
            window[0] = bos_token
        logits = decoded_logits(engine, window, first) if decode \
            else engine.logits(window, positions=list(range(first, context - 1)))
        targets = np.asarray(window[first + 1:])
        total_nll -= float(log_softmax_at(logits, targets).sum())
        scored += len(targets)
        if base is not None:
            reference = base.logits(window, positions=list(range(first, context - 1)))
            base_nll -= float(log_softmax_at(reference, targets).sum())
            divergences.append(kl_divergence(reference, logits))
            same_top += int((reference.argmax(-1) == logits.argmax(-1)).sum())
        if progress is not None:
            progress(index + 1, chunks, math.exp(total_nll / scored))
    result = {"perplexity": math.exp(total_nll / scored), "chunks": chunks,
              "scored_tokens": scored, "tokens": len(tokens), "context": context,
              "path": "decode" if decode else "prefill",
              "seconds": time.perf_counter() - start_time}
    if base is not None:
        kl = np.concatenate(divergences)
        result.update(base_perplexity=math.exp(base_nll / scored),
                      kl_divergence=float(kl.mean()),
                      kl_divergence_stderr=float(kl.std(ddof=1) / math.sqrt(len(kl)))
                      if len(kl) > 1 else 0.0,
                      same_top_token=same_top / scored)
    return result
