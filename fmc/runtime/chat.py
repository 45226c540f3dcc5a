"""Multi-turn chat over one KV-cache sequence, with the model's own chat template.

The template is the Jinja `chat_template` of the artifact's `tokenizer_config.json` (HF
checkpoints ship it; fmc writes the GGUF one there), rendered as transformers renders it
(sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `bos_token`/`eos_token`). Each
turn renders the whole conversation, keeps the cached tokens it shares with the sequence,
pops the rest and prefills only the new tail: no turn re-prefills the history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmc.errors import ArtifactError, UsageError
from fmc.runtime.generation import Generation
from fmc.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from fmc.runtime.engine import Engine


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ChatTemplate:
    def __init__(self, artifact: Path):
        path = artifact / "tokenizer" / "tokenizer_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            config = {}
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: corrupt ({exc}); recompile the artifact") from None
        if not isinstance(config, dict):
            raise ArtifactError(f"{path}: corrupt (not a JSON object); recompile the artifact")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str) or not template:
            raise ArtifactError(f"{path}: no chat_template; this model has no chat format "
                                "(use fmc run)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            self.template = environment.from_string(template)
        except TemplateError as exc:
            raise ArtifactError(f"{path}: chat_template does not parse ({exc})") from None
        self.special = {"bos_token": _token_text(config.get("bos_token")),
                        "eos_token": _token_text(config.get("eos_token"))}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except TemplateError as exc:
            raise UsageError(f"chat template: {exc}") from None


class Conversation:
    """`reply(text)` streams the assistant's answer; `save`/`Conversation.resume` keep a
    conversation (messages and KV state) in a session file."""

    def __init__(self, engine: Engine, system: str | None = None,
                 sampling: SamplingParams | None = None, session: Path | None = None):
        """A new conversation, or (`session`) the one saved in that file."""
        self.engine = engine
        self.template = ChatTemplate(engine.path)
        self.sampling = sampling or SamplingParams()
        if session is not None:
            self.seq, extra = engine.restore(session)
            self.messages: list[dict[str, str]] = list(extra.get("messages", []))
        else:
            self.seq = engine.new_sequence()
            self.messages = [{"role": "system", "content": system}] if system else []
        self.prefilled = 0  # tokens prefilled by the last turn (the tail, not the history)

    @classmethod
    def resume(cls, engine: Engine, path: Path, sampling: SamplingParams | None = None):
        return cls(engine, sampling=sampling, session=path)

    def save(self, path: Path) -> None:
        self.engine.save(self.seq, path, {"messages": self.messages})

    def _sync(self, ids: list[int]):
        """Make the cached sequence equal `ids`; returns the logits after its last token."""
        engine, cached = self.engine, self.engine.history[self.seq]
        common = 0
        for a, b in zip(cached, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always prefill at least one token for logits
        engine.pop(self.seq, len(cached) - common)
        self.prefilled = len(ids) - common
        return engine.prefill(self.seq, ids[common:])

    def reply(self, text: str, max_tokens: int = 256) -> Iterator[str]:
        """Stream the answer to `text`. Stopping the iteration early (Ctrl-C) keeps what was
        said so far as the assistant's message."""
        engine = self.engine
        self.messages.append({"role": "user", "content": text})
        prompt = engine.tokenizer.encode(self.template.render(self.messages),
                                         add_special_tokens=False)
        try:
            engine.check_prompt(prompt, "the conversation", room=1)
        except UsageError:
            self.messages.pop()
            raise
        generation = Generation(engine.stop_rule(max_tokens), self.sampling, engine.tokenizer)
        answer: list[int] = []
        try:
            if generation.finished:
                return
            for step in engine.continue_steps(self.seq, self._sync(prompt), generation):
                if step.token is not None:
                    answer.append(step.token)
                if step.text:
                    yield step.text
        finally:
            self.messages.append({"role": "assistant",
                                  "content": engine.tokenizer.decode(answer)})
