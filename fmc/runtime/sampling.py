"""Pick the next token from float32 logits: greedy, or temperature with top-k and top-p,
after an optional repetition penalty; random choices come from a seeded RNG. Vectorised over
the vocabulary (numpy), once per token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmc.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0 → no limit
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the sequence

    def __post_init__(self):
        if self.temperature < 0:
            raise UsageError(f"--temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be ≥ 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        """The next token; `history` (the sequence's tokens) for the repetition penalty."""
        if self.params.repetition_penalty != 1 and history:
            logits = penalize(logits, history, self.params.repetition_penalty)
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.params.temperature
        if 0 < self.params.top_k < len(scaled):
            cutoff = np.partition(scaled, -self.params.top_k)[-self.params.top_k]
            scaled = np.where(scaled >= cutoff, scaled, -np.inf)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.params.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.params.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(len(probs), p=probs))


def penalize(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """CTRL's repetition penalty, as transformers applies it: the logit of every token seen
    so far is divided by `penalty` if positive, multiplied if negative."""
    seen = np.unique(np.asarray(history, dtype=np.int64))
    out = logits.copy()
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out
