"""Config mapping shared by the families: Hugging Face `config.json` and GGUF metadata →
ModelConfig. Each family (`fmc/frontend/archs/`) maps its own keys with these helpers;
`config_from_hf` finds the family by `model_type`."""

from __future__ import annotations

import numbers
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


def llama_config(reader: ConfigReader, architecture: str, **overrides: Any) -> ModelConfig:
    """The keys every llama-style config shares; `overrides` sets the family's own."""
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


_common = llama_config  # the name before families had their own modules


def numpy_bool() -> type:
    import numpy

    return numpy.bool_


class GGUFMetadata:
    """A GGUF file's metadata for a family's config mapping: `get(key)` reads
    `<arch>.<key>`; every error names the file and the key."""

    def __init__(self, fields: dict, tensor_names: set[str], origin: str, read_tensor=None):
        self.fields = fields
        self.tensor_names = tensor_names
        self.origin = origin
        self.arch = fields.get("general.architecture")
        self._read_tensor = read_tensor

    def get(self, key: str, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.fields:
            return self.fields[full]
        if default is ...:
            raise InputError(f"{self.origin}: GGUF metadata {full!r} is missing")
        return default

    def int(self, key: str, default: Any = ...) -> int:
        """`get` for an integer: a value of another type is an error naming the key."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self._wrong_type(key, "an integer", value)
        return int(value)

    def float(self, key: str, default: Any = ...) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self._wrong_type(key, "a number", value)
        return float(value)

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.get(key, default)
        if not isinstance(value, (bool, numpy_bool())):
            raise self._wrong_type(key, "true or false", value)
        return bool(value)

    def _wrong_type(self, key: str, wanted: str, value: Any) -> InputError:
        shown = repr(value)
        return InputError(f"{self.origin}: GGUF metadata '{self.arch}.{key}' must be {wanted}, "
                          f"got {shown[:60] + '…' if len(shown) > 60 else shown}")

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_names

    def tensor(self, name: str) -> Any:
        """A tensor that holds configuration (`Architecture.gguf_config_tensors`), flat
        float32."""
        if name not in self.tensor_names or self._read_tensor is None:
            raise InputError(f"{self.origin}: GGUF tensor {name!r} is missing")
        return self._read_tensor(name)


def llama_config_from_gguf(meta: GGUFMetadata, architecture: str,
                           **overrides: Any) -> ModelConfig:
    """The llama-style keys of GGUF metadata (llama.cpp's `LLM_KV_*` names)."""
    if f"{meta.arch}.rope.scaling.type" in meta.fields or meta.has_tensor("rope_freqs.weight"):
        raise InputError(f"{meta.origin}: GGUF RoPE scaling (rope_freqs) is not supported; "
                         "compile the Hugging Face checkpoint instead")
    heads = meta.int("attention.head_count")
    hidden = meta.int("embedding_length")
    tokens = meta.fields.get("tokenizer.ggml.tokens") or []
    if not isinstance(tokens, list):
        raise InputError(f"{meta.origin}: GGUF metadata 'tokenizer.ggml.tokens' must be a "
                         f"list of strings, got {type(tokens).__name__}")
    eos = meta.fields.get("tokenizer.ggml.eos_token_id")
    values: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=meta.int("vocab_size", len(tokens)),
        hidden_size=hidden,
        intermediate_size=meta.int("feed_forward_length"),
        num_hidden_layers=meta.int("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.int("attention.head_count_kv", heads),
        head_dim=meta.int("attention.key_length", hidden // heads if heads else 0),
        rms_norm_eps=meta.float("attention.layer_norm_rms_epsilon"),
        rope_theta=meta.float("rope.freq_base", 10000.0),
        max_position_embeddings=meta.int("context_length"),
        tie_word_embeddings=not meta.has_tensor("output.weight"),
        qkv_bias=meta.has_tensor("blk.0.attn_q.bias"),
        o_bias=meta.has_tensor("blk.0.attn_output.bias"),
        bos_token_id=meta.fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if isinstance(eos, int) else (),
    )
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except InputError as exc:
        raise InputError(f"{meta.origin}: {str(exc).removeprefix('config: ')}") from None


def config_from_hf(data: object, origin: str) -> ModelConfig:
    """Parse a Hugging Face config dict; `origin` (the file) prefixes every error."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: must be a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise InputError(f"{origin}: 'model_type' is missing")
    from fmc.frontend.archs import registry

    arch = registry.by_model_type(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise InputError(f"{origin}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(registry.model_types())}")
    return arch.config_from_hf(ConfigReader(data, origin))
