"""The tokenizer files a checkpoint directory brings, checked before they go into an artifact:
the runtime must never be the first to find that one of them does not parse."""

from __future__ import annotations

import json
from pathlib import Path

from fmc.errors import InputError

# Files copied into the artifact so the runtime can tokenize and apply chat templates.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
)
JSON_OBJECTS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tokenizer_files(directory: Path) -> dict[str, Path]:
    """{name: path} of the tokenizer files in `directory`, each parsed and checked."""
    files = {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}
    for name in JSON_OBJECTS:
        if name in files:
            _json_object(files[name])
    if "tokenizer.json" in files:
        _check_tokenizer(files["tokenizer.json"])
    if "tokenizer_config.json" in files:
        _check_chat_template(files["tokenizer_config.json"])
    return files


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: must be a JSON object, got {type(value).__name__}")
    return value


def _check_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own untyped Exception
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a Hugging Face tokenizer ({detail})") from None


def _check_chat_template(path: Path) -> None:
    """chat_template, when given: a Jinja string, or HF's list of {name, template}."""
    template = _json_object(path).get("chat_template")
    if template is None:
        return
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                   and isinstance(t.get("template"), str) for t in template):
            raise InputError(f"{path}: chat_template must be a string or a list of "
                             "{\"name\": …, \"template\": …} objects")
        templates = [t["template"] for t in template]
    elif isinstance(template, str):
        templates = [template]
    else:
        raise InputError(f"{path}: chat_template must be a string, got "
                         f"{type(template).__name__}")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for text in templates:
        try:
            environment.parse(text)
        except TemplateError as exc:
            raise InputError(f"{path}: chat_template does not parse ({exc})") from None
