"""Hugging Face `config.json` → ModelConfig, one parser per supported `model_type`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fmc.errors import InputError
from fmc.model_config import ModelConfig

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


class ConfigReader:
    """Typed access to a config dict; every error names the file and the key."""

    def __init__(self, data: dict[str, Any], origin: str):
        self.data = data
        self.origin = origin

    def _fail(self, key: str, problem: str) -> InputError:
        return InputError(f"{self.origin}: {key!r} {problem}")

    def int(self, key: str, default: Any = ...) -> int:
        value = self.data.get(key, default)
        if value is ...:
            raise self._fail(key, "is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        return value

    def float(self, key: str, default: Any = ...) -> float:
        value = self.data.get(key, default)
        if value is ...:
            raise self._fail(key, "is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def optional_int(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.int(key)

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self._fail(key, f"must be a token id or a list of them, got {value!r}")
        return tuple(values)


def _rope(reader: ConfigReader) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and llama3 scaling, from either the 4.x keys or 5.x `rope_parameters`."""
    params = reader.data.get("rope_parameters") or {}
    scaling = reader.data.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise reader._fail("rope_parameters", "must be an object")
    merged = {**params, **scaling}
    theta = merged.get("rope_theta", reader.data.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise reader._fail("rope_theta", f"must be a number, got {theta!r}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise reader._fail("rope_scaling", f"type {rope_type!r} is not supported "
                           "(supported: default, llama3)")
    missing = [k for k in ROPE_SCALING_KEYS if k not in merged]
    if missing:
        raise reader._fail("rope_scaling", f"of type llama3 lacks {', '.join(missing)}")
    return float(theta), {"rope_type": "llama3", **{k: float(merged[k]) for k in ROPE_SCALING_KEYS}}


def _common(reader: ConfigReader, architecture: str, **overrides: Any) -> ModelConfig:
    act = reader.data.get("hidden_act", "silu")
    if act != "silu":
        raise reader._fail("hidden_act", f"{act!r} is not supported (only silu)")
    hidden = reader.int("hidden_size")
    heads = reader.int("num_attention_heads")
    if heads > 0 and hidden % heads and "head_dim" not in reader.data:
        raise InputError(f"{reader.origin}: hidden_size ({hidden}) is not a multiple of "
                         f"num_attention_heads ({heads}) and no head_dim is given")
    theta, scaling = _rope(reader)
    values: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=reader.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=reader.int("intermediate_size"),
        num_hidden_layers=reader.int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=reader.int("num_key_value_heads", heads),
        head_dim=reader.optional_int("head_dim") or (hidden // heads if heads > 0 else 0),
        rms_norm_eps=reader.float("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=reader.int("max_position_embeddings", 2048),
        tie_word_embeddings=reader.bool("tie_word_embeddings", False),
        bos_token_id=reader.optional_int("bos_token_id"),
        eos_token_ids=reader.token_ids("eos_token_id"),
    )
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except InputError as exc:
        raise InputError(f"{reader.origin}: {str(exc).removeprefix('config: ')}") from None


def parse_llama(reader: ConfigReader) -> ModelConfig:
    bias = reader.bool("attention_bias", False)
    return _common(reader, "llama", qkv_bias=bias, o_bias=bias,
                   mlp_bias=reader.bool("mlp_bias", False))


def parse_mistral(reader: ConfigReader) -> ModelConfig:
    return _common(reader, "mistral", sliding_window=reader.optional_int("sliding_window"))


def parse_qwen2(reader: ConfigReader) -> ModelConfig:
    if reader.bool("use_sliding_window", False):
        raise reader._fail("use_sliding_window", "true is not supported for qwen2")
    return _common(reader, "qwen2", qkv_bias=True)


ARCHITECTURES: dict[str, Callable[[ConfigReader], ModelConfig]] = {
    "llama": parse_llama,
    "mistral": parse_mistral,
    "qwen2": parse_qwen2,
}


def config_from_hf(data: object, origin: str) -> ModelConfig:
    """Parse a Hugging Face config dict; `origin` (the file) prefixes every error."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: must be a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise InputError(f"{origin}: 'model_type' is missing")
    parser = ARCHITECTURES.get(model_type)
    if parser is None:
        raise InputError(f"{origin}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return parser(ConfigReader(data, origin))
