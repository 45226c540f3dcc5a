"""The architecture registry: one `Architecture` per model family, registered by its module.

A family module (`fmc/frontend/archs/<family>.py`, or a user's file given to
`--arch-plugin`) calls `register(Architecture(...))` once. Everything fmc knows about a
family is in that record: the names it answers to (Hugging Face `model_type`, GGUF
`general.architecture`), how a config becomes a `ModelConfig`, how checkpoint tensor names
map onto the model's parameter names (as data), the `nn.Module` factory, tokenizer and
chat-template defaults, and what the model needs from the paged KV cache. The pipeline,
the quantizers and the targets never branch on a family: they see the `nn.Module`.

This module imports neither TVM nor a family's model code (`fmc archs` lists without TVM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmc.errors import InputError

# Modules of fmc.frontend.archs that are not families.
INFRASTRUCTURE = {"registry"}

# GGUF tensor names (llama.cpp's) → the llama-style model's parameter names.
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass(frozen=True)
class FusedWeight:
    """A checkpoint tensor that stacks several of the model's layers by rows (phi3's
    `qkv_proj`, `gate_up_proj`); fmc splits it on load, so the model keeps one layer per
    projection (horizontal fusion joins them again at compile time) and tensor parallelism,
    the quantizers and the calibration see the llama-style names.

    `fused` and `parts` are module paths below a layer (`self_attn.qkv_proj` →
    `self_attn.q_proj`, …); `rows(config)` gives each part's number of rows, in order."""

    fused: str
    parts: tuple[str, ...]
    rows: Callable[[Any], tuple[int, ...]]


def qkv_rows(config) -> tuple[int, ...]:
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return q, kv, kv


def gate_up_rows(config) -> tuple[int, ...]:
    return config.intermediate_size, config.intermediate_size


FUSED_QKV = FusedWeight("self_attn.qkv_proj",
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv_rows)
FUSED_GATE_UP = FusedWeight("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), gate_up_rows)


@dataclass(frozen=True)
class KVCacheNeeds:
    """What a family asks of TVM's paged KV cache (`nn.llm.TIRPagedKVCache`).

    rope: "normal" — the cache rotates q and k at append (HF's rotate-half; llama3 scaling
    from the config), so the model hands it un-rotated q/k/v; "none" — the model rotates
    itself. sliding_window: "none" — every layer attends to the whole sequence (a config's
    `sliding_window` then caps the context, as for mistral); "per-layer" — some layers attend
    within a window, the context uncapped: fmc's attention kernels apply it on every target,
    by exact positions (gemma2, gemma3; fmc.frontend.gemma_model). Such a family names those
    layers in `arch_options` as `sliding_window` and `sliding_layers`
    (`ModelConfig.windowed_layers`), which the memory estimate and `fmc inspect` read."""

    attn_kind: str = "mha"
    rope: str = "normal"
    sliding_window: str = "none"

    def __post_init__(self) -> None:
        if self.attn_kind != "mha" or self.rope not in ("normal", "none") or \
                self.sliding_window not in ("none", "per-layer"):
            raise InputError(f"KV cache needs {self.describe()} are not supported (fmc's "
                             "caches: attn_kind 'mha', rope 'normal' or 'none', "
                             "sliding_window 'none' or 'per-layer')")

    def describe(self) -> dict[str, str]:
        return {"attn_kind": self.attn_kind, "rope": self.rope,
                "sliding_window": self.sliding_window}


@dataclass(frozen=True)
class Architecture:
    """One model family.

    config_from_hf(reader) → ModelConfig, where reader is a `ConfigReader` over config.json
    (`fmc.frontend.architectures`); config_from_gguf(meta) → ModelConfig, where meta is a
    `GGUFMetadata` (None: the family has no GGUF form). model(config, dtype, target,
    debug_layers=, tensor_parallel=) builds the `nn.Module` with fmc's entry functions
    (usually `fmc.frontend.llama_model.LlamaForCausalLM` or a subclass).

    hf_weight_names: substring → replacement applied in order to every checkpoint tensor
    name (empty: the checkpoint's names are the model's). gguf_global_names /
    gguf_layer_names: llama.cpp's names (`blk.N.<layer name>.weight|bias`) → the model's;
    gguf_permuted_qk: llama.cpp's converter permuted this family's Q/K rows (undone).
    hf_stacked: modules whose numbered children are stacked into one tensor at load."""

    name: str
    doc: str
    model: Callable[..., Any]
    config_from_hf: Callable[[Any], Any]
    hf_model_types: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    config_from_gguf: Callable[[Any], Any] | None = None
    hf_weight_names: dict[str, str] = field(default_factory=dict)
    # Modules whose numbered children the checkpoint stores one by one and the model holds
    # stacked along a new first axis: `experts` turns `….experts.<i>.w1.weight` (i = 0…E−1)
    # into the model's `….experts.w1.weight` [E, …] (mixture-of-experts families).
    hf_stacked: tuple[str, ...] = ()
    gguf_global_names: dict[str, str] = field(default_factory=lambda: dict(GGUF_GLOBAL_NAMES))
    gguf_layer_names: dict[str, str] = field(default_factory=lambda: dict(GGUF_LAYER_NAMES))
    gguf_permuted_qk: bool = False
    # Parameter-name suffix → value added to those GGUF tensors on load: llama.cpp stores
    # gemma's norm weights as 1 + w, so gemma says {"norm.weight": -1.0}.
    gguf_weight_offsets: dict[str, float] = field(default_factory=dict)
    # preset name → a Hugging Face config dict (a weights-free compile; --weights adds them)
    presets: dict[str, dict] = field(default_factory=dict)
    # The chat template of a GGUF file that brings none (HF directories bring their own).
    chat_template: str | None = None
    kv_cache: KVCacheNeeds = field(default_factory=KVCacheNeeds)
    # Checkpoint tensors (HF or GGUF, under the model's names) split by rows on load.
    fused_weights: tuple[FusedWeight, ...] = ()
    # GGUF tensors that hold configuration, read by config_from_gguf (`meta.tensor(name)`)
    # rather than loaded as weights (phi3's `rope_factors_long.weight`).
    gguf_config_tensors: tuple[str, ...] = ()
    features: tuple[str, ...] = ()  # peculiarities, one phrase each (`fmc archs`)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "hf_model_types": list(self.hf_model_types),
                "gguf_architectures": list(self.gguf_architectures),
                "presets": sorted(self.presets), "features": list(self.features),
                "kv_cache": self.kv_cache.describe(),
                "chat_template_default": self.chat_template is not None}

    def hf_name(self, name: str) -> str:
        for old, new in self.hf_weight_names.items():
            name = name.replace(old, new)
        return name


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) a family; its model types, GGUF names and presets must not be
    another family's."""
    for other in ARCHITECTURES.values():
        if other.name == arch.name:
            continue
        for kind, mine, theirs in (
                ("model_type", arch.hf_model_types, other.hf_model_types),
                ("GGUF architecture", arch.gguf_architectures, other.gguf_architectures),
                ("preset", tuple(arch.presets), tuple(other.presets))):
            clash = sorted(set(mine) & set(theirs))
            if clash:
                raise InputError(f"architecture {arch.name!r}: {kind} {clash[0]!r} is already "
                                 f"architecture {other.name!r}'s")
    ARCHITECTURES[arch.name] = arch
    return arch


def _load_builtins() -> None:
    from fmc.plugins import import_builtins

    import_builtins("fmc.frontend.archs", INFRASTRUCTURE)


def all_architectures() -> dict[str, Architecture]:
    _load_builtins()
    return dict(sorted(ARCHITECTURES.items()))


def get(name: str) -> Architecture:
    """A family by its fmc name (`ModelConfig.architecture`)."""
    _load_builtins()
    if name not in ARCHITECTURES:
        raise InputError(f"architecture {name!r} is not registered (known: "
                         f"{', '.join(sorted(ARCHITECTURES))}; a plugin's architecture "
                         "needs its --arch-plugin file)")
    return ARCHITECTURES[name]


def by_model_type(model_type: str) -> Architecture | None:
    _load_builtins()
    return next((a for a in ARCHITECTURES.values() if model_type in a.hf_model_types), None)


def by_gguf_architecture(name: str) -> Architecture | None:
    _load_builtins()
    return next((a for a in ARCHITECTURES.values() if name in a.gguf_architectures), None)


def model_types() -> list[str]:
    _load_builtins()
    return sorted(t for a in ARCHITECTURES.values() for t in a.hf_model_types)


def gguf_architectures() -> list[str]:
    _load_builtins()
    return sorted(t for a in ARCHITECTURES.values() for t in a.gguf_architectures)


def presets() -> dict[str, dict]:
    """Every registered family's presets: name → Hugging Face config dict."""
    _load_builtins()
    return {name: config for a in ARCHITECTURES.values() for name, config in a.presets.items()}


def load_plugin(path: str | Path) -> list[str]:
    """Import a user's architecture file; returns the family names it registered."""
    from fmc.plugins import import_registering

    _load_builtins()
    return import_registering(path, "architecture plugin", ARCHITECTURES,
                              "architecture (call fmc.frontend.archs.register)")
