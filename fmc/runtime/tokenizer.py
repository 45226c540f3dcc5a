"""The artifact's tokenizer (HF `tokenizers`) and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

from fmc.errors import ArtifactError


class TextTokenizer:
    def __init__(self, artifact: Path):
        from tokenizers import Tokenizer

        path = artifact / "tokenizer" / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; this artifact has no tokenizer (pass token "
                                "ids through the Python API instead)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own untyped Exception
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{path}: corrupt ({detail}); recompile the artifact") \
                from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; chat-template output passes add_special_tokens=False (the template
        writes BOS itself when the model wants one)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta
