"""The architecture description every phase shares: one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fmc.errors import InputError


@dataclass(frozen=True)
class ModelConfig:
    """A llama-style decoder in fmc's own terms; `architecture` names its family
    (fmc/frontend/archs/). Serialized as manifest.json's "model": fields are only ever
    added, with defaults, so older manifests keep loading."""

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
    # {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings}
    # (the KV cache applies it), or phi3's {"rope_type": "longrope", original_max_position_
    # embeddings, attention_factor, long_factor, short_factor} (the model applies it).
    rope_scaling: dict[str, Any] | None = None
    # Attention window of Mistral-style models; fmc caps the context at it (see context_window).
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Per-head RMSNorm of q and k (weights [head_dim]) before RoPE (qwen3).
    qk_norm: bool = False
    # A family's own settings beyond these fields (JSON values; plugins' architectures).
    arch_options: dict[str, Any] = field(default_factory=dict)
    # Mixture of experts (mixtral, qwen3_moe): every layer's MLP is `num_experts` experts of
    # width intermediate_size, `num_experts_per_tok` of them chosen per token by a softmax
    # router; `norm_topk_prob`: the chosen experts' weights are renormalised to sum to 1.
    # 0 experts: a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True

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
        if self.num_experts or self.num_experts_per_tok:
            for key in ("num_experts", "num_experts_per_tok"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise InputError(f"{origin}: {key} must be a positive integer, got "
                                     f"{value!r}")
            if self.num_experts_per_tok > self.num_experts:
                raise InputError(f"{origin}: num_experts_per_tok ({self.num_experts_per_tok}) "
                                 f"exceeds the number of experts ({self.num_experts})")
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

    @property
    def windowed_layers(self) -> tuple[int, tuple[int, ...]] | None:
        """(window, layer indices) of the layers that attend within a window while the
        context stays uncapped (gemma2/gemma3 name them in `arch_options` as
        `sliding_window` and `sliding_layers`); None when no layer does."""
        layers = self.arch_options.get("sliding_layers") or ()
        window = self.arch_options.get("sliding_window")
        return (int(window), tuple(int(i) for i in layers)) if layers and window else None

    def features(self) -> list[str]:
        """What this config switches on beyond the plain llama decoder (`fmc inspect`)."""
        found = []
        if self.qk_norm:
            found.append("per-head q/k RMSNorm")
        biases = [name for name, on in (("q/k/v", self.qkv_bias), ("o", self.o_bias),
                                        ("MLP", self.mlp_bias)) if on]
        if biases:
            found.append(f"{', '.join(biases)} biases")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            found.append(f"head_dim {self.head_dim}")
        if self.rope_scaling:
            found.append(f"{self.rope_scaling.get('rope_type', '?')} RoPE scaling")
        if self.sliding_window:
            found.append(f"sliding window {self.sliding_window} (caps the context)")
        if self.num_experts:
            found.append(f"mixture of experts: {self.num_experts_per_tok} of "
                         f"{self.num_experts} per token, top-k weights "
                         f"{'renormalised' if self.norm_topk_prob else 'not renormalised'}")
        windowed = self.windowed_layers
        if windowed:
            window, layers = windowed
            found.append(f"sliding window {window} on {len(layers)} of "
                         f"{self.num_hidden_layers} layers (context not capped)")
        found.append("tied embeddings" if self.tie_word_embeddings else "untied embeddings")
        shown = {"sliding_window", "sliding_layers"} if windowed else set()
        found.extend(f"{key}={value}" for key, value in sorted(self.arch_options.items())
                     if key not in shown)
        return found

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

    def param_count(self, active: bool = False) -> int:
        """Number of weights (embedding counted once when tied). `active`: those one token's
        forward reads — of a mixture of experts, only its `num_experts_per_tok` experts."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        mlp = 3 * h * i
        if self.num_experts:  # the experts and the router [experts, hidden]
            mlp = mlp * (self.num_experts_per_tok if active else self.num_experts) + \
                self.num_experts * h
        per_layer = h * (q + 2 * kv) + q * h + mlp + 2 * h
        if self.qk_norm:
            per_layer += 2 * d
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
