"""The architecture description every phase shares: one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fmc.errors import InputError


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (llama, mistral, qwen2) in fmc's own terms."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Only {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings}.
    rope_scaling: dict[str, Any] | None = None
    # Attention window of Mistral-style models; fmc caps the context at it (see context_window).
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, origin: str = "config") -> None:
        """Reject values no model can have; the message names the offending key."""
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{origin}: {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(
                f"{origin}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise InputError(f"{origin}: head_dim ({self.head_dim}) must be even for RoPE")
        if not (self.rms_norm_eps > 0):
            raise InputError(f"{origin}: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0):
            raise InputError(f"{origin}: rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def context_window(self) -> int:
        """Longest sequence this model computes exactly (a sliding window caps it)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"model config: unknown key(s) {', '.join(unknown)}")
        values = dict(data)
        values["eos_token_ids"] = tuple(values.get("eos_token_ids", ()))
        try:
            return cls(**values)
        except TypeError as exc:
            raise InputError(f"model config: {exc}") from None

    def param_count(self) -> int:
        """Number of weights (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.o_bias:
            per_layer += h
        if self.mlp_bias:
            per_layer += 2 * i + h
        total = self.vocab_size * h + self.num_hidden_layers * per_layer + h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total
