"""Perplexity over a text with llama.cpp's protocol, so the two engines are comparable.

The token stream is cut into non-overlapping windows of `context` tokens; each window is
evaluated from scratch and only its second half is scored (every scored token has at least
context/2 tokens of history), exactly as `llama-perplexity -c N` does."""

from __future__ import annotations

import math
import time

import numpy as np

from fmc.errors import UsageError


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of float logits, computed in float64."""
    rows = logits.astype(np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=-1)) + peak[:, 0]
    return rows[np.arange(len(targets)), targets] - log_norm


def perplexity(engine, tokens: list[int], context: int = 512, max_chunks: int | None = None,
               bos_token: int | None = None, progress=None) -> dict:
    """Returns {"perplexity", "chunks", "scored_tokens", "tokens", "seconds"}."""
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
    start_time = time.perf_counter()
    for index in range(chunks):
        window = list(tokens[index * context:(index + 1) * context])
        if bos_token is not None:
            window[0] = bos_token
        logits = engine.logits(window, positions=list(range(first, context - 1)))
        targets = np.asarray(window[first + 1:])
        total_nll -= float(log_softmax_at(logits, targets).sum())
        scored += len(targets)
        if progress is not None:
            progress(index + 1, chunks, math.exp(total_nll / scored))
    return {"perplexity": math.exp(total_nll / scored), "chunks": chunks,
            "scored_tokens": scored, "tokens": len(tokens), "context": context,
            "seconds": time.perf_counter() - start_time}
