"""Structured output: `response_format` (json_object, json_schema) and forced tool calls,
enforced by a token mask at every step with llguidance (built from the artifact's own
`tokenizer.json`). One `LLMatcher` per choice; the engine loop asks it for the mask before
sampling and feeds it the sampled token after."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from fmc.serve.schema import APIError

_lock = threading.Lock()
_tokenizers: dict[str, Any] = {}  # artifact path → llguidance.LLTokenizer


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise APIError(400, "structured output needs llguidance on the server "
                       "(pip install 'fmc[serve]')", param="response_format") from None
    return llguidance


def tokenizer_for(engine):
    """The llguidance tokenizer of an engine's artifact, built once (about a second for a
    large vocabulary: call it off the event loop)."""
    key = str(engine.path)
    with _lock:
        if key not in _tokenizers:
            llguidance = _llguidance()
            text = (engine.path / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
            _tokenizers[key] = llguidance.LLTokenizer(
                text, n_vocab=engine.config.vocab_size,
                eos_token=sorted(engine.config.eos_token_ids) or None)
        return _tokenizers[key]


def tool_call_schema(tools: list[dict], names: list[str]) -> dict:
    """The JSON a forced tool call must be: {"name": one of `names`, "arguments": {…}}."""
    options = []
    for tool in tools:
        function = tool["function"]
        if function["name"] in names:
            options.append({"type": "object", "additionalProperties": False,
                            "required": ["name", "arguments"],
                            "properties": {"name": {"const": function["name"]},
                                           "arguments": function.get("parameters") or
                                           {"type": "object"}}})
    return options[0] if len(options) == 1 else {"anyOf": options}


class Grammar:
    """A compiled JSON-schema grammar; `matcher()` makes one per choice."""

    def __init__(self, engine, schema: dict, param: str):
        llguidance = _llguidance()
        self.tokenizer = tokenizer_for(engine)
        self.vocab = engine.config.vocab_size
        try:
            self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except Exception as exc:  # llguidance raises ValueError / its own errors
            raise APIError(400, f"'{param}': the JSON schema is not usable ({exc})",
                           param=param) from None
        probe = self.matcher()
        if probe.is_error():
            raise APIError(400, f"'{param}': the JSON schema is not usable "
                           f"({probe.error()})", param=param)

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    def __init__(self, grammar: Grammar):
        import llguidance
        import llguidance.numpy as lnp

        self._lnp = lnp
        self._matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.grammar)
        self._mask = lnp.allocate_token_bitmask(1, grammar.vocab)

    def is_error(self) -> bool:
        return self._matcher.is_error()

    def error(self) -> str:
        return self._matcher.get_error()

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids at -inf."""
        self._lnp.fill_next_token_bitmask(self._matcher, self._mask, 0)
        out = np.array(logits, dtype=np.float32)[None]
        self._lnp.apply_token_bitmask_inplace(out, self._mask)
        return out[0]

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ValueError(f"the grammar rejected token {token}: {self._matcher.get_error()}")
