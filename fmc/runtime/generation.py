"""The one generation policy: what happens to each set of next-token logits.

Every loop that produces tokens — `Engine.generate_ids`/`stream`, `fmc chat`, the batch
scheduler behind `stream_async`, and a server on top of them — runs the model its own way
(alone, in a conversation, batched) but hands each logits row to `Generation.step`, which
samples a token and applies the stop rule, in this order:

1. the sampled token is an end-of-sequence id (when the rule stops there): finish "stop",
   the token is not emitted;
2. the token is emitted, and its text is checked against the stop strings: a match finishes
   "stop", and the text from the stop string on is withheld (OpenAI's `stop` semantics);
3. `max_tokens` tokens emitted: finish "length";
4. the context is full — the sequence already holds `context_window` tokens, so decoding
   the emitted token would not fit: finish "length".

Otherwise the caller decodes the emitted token and calls `step` again with the new logits.
`max_tokens == 0` finishes before the prompt is run (`Generation.finished` is set at once).
Finish reasons are OpenAI's: "stop" and "length"."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fmc.errors import UsageError
from fmc.runtime.sampling import Sampler, SamplingParams
from fmc.runtime.tokenizer import StreamDecoder


@dataclass(frozen=True)
class StopRule:
    max_tokens: int
    context_window: int
    eos_token_ids: frozenset[int] = frozenset()  # empty: generate through end-of-sequence
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 0:
            raise UsageError(f"--max-tokens must be ≥ 0, got {self.max_tokens}")
        if any(not s for s in self.stop_strings):
            raise UsageError("a stop string must not be empty")

    @classmethod
    def of(cls, max_tokens: int, context_window: int, eos_token_ids: Iterable[int] = (),
           stop_at_eos: bool = True, stop: Iterable[str] = ()) -> StopRule:
        return cls(max_tokens, context_window,
                   frozenset(eos_token_ids) if stop_at_eos else frozenset(), tuple(stop))


@dataclass(frozen=True)
class Step:
    token: int | None  # the emitted token; None when end-of-sequence ended the generation
    text: str  # text released by this step (stop strings and incomplete UTF-8 held back)
    finish_reason: str | None  # None: decode `token` and step again; else "stop"/"length"


class Generation:
    """One request's sampler, counters and text; `step` once per logits row."""

    def __init__(self, rule: StopRule, sampling: SamplingParams | None = None,
                 tokenizer=None):
        if rule.stop_strings and tokenizer is None:
            raise UsageError("stop strings need the artifact's tokenizer")
        self.rule = rule
        self.sampler = Sampler(sampling or SamplingParams())
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.produced = 0
        self.pending = ""  # decoded text not yet released: it may begin a stop string
        self.finish_reason: str | None = "length" if rule.max_tokens == 0 else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits, history: list[int], length: int) -> Step:
        """Sample from `logits` for a sequence of `length` tokens whose ids are `history`
        (for the repetition penalty) and apply the stop rule."""
        if self.finished:
            raise UsageError(f"the generation has finished ({self.finish_reason})")
        token = self.sampler(logits, history)
        if token in self.rule.eos_token_ids:
            return self._finish(None, "stop")
        self.produced += 1
        if self.decoder is not None:
            self.pending += self.decoder.push(token)
            for stop in self.rule.stop_strings:
                at = self.pending.find(stop)
                if at >= 0:
                    self.pending = self.pending[:at]
                    return self._finish(token, "stop")
        if self.produced >= self.rule.max_tokens or length >= self.rule.context_window:
            return self._finish(token, "length")
        return Step(token, self._release(), None)

    def _finish(self, token: int | None, reason: str) -> Step:
        self.finish_reason = reason
        text, self.pending = self.pending, ""
        return Step(token, text, reason)

    def _release(self) -> str:
        """The pending text that cannot be the start of a stop string."""
        keep = max((overlap(self.pending, stop) for stop in self.rule.stop_strings), default=0)
        released = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return released


def overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
