"""Activation statistics for `--calib`: run the float model over a text and record, for every
linear layer, the mean square of each input channel (llama.cpp's importance matrix; AWQ's
activation scale). The quantizers then weight each column's error by it.

The forward pass is a plain numpy reference of the Llama-family decoder, evaluated layer by
layer over all windows at once, so only one layer's weights are in memory at a time (a 7B
checkpoint streams through like the weights phase). Reference: transformers
`models/llama/modeling_llama.py` (rotate_half RoPE, llama3 frequency scaling)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmc.errors import InputError
from fmc.frontend.weights import WeightSource
from fmc.model_config import ModelConfig

WINDOW = 512  # tokens per calibration window (llama-imatrix's default context)
MAX_WINDOWS = 16  # at most this many windows of the text are run


@dataclass(frozen=True)
class Calibration:
    """Per checkpoint tensor name, the mean square [K] of its input channels."""

    importance: dict[str, np.ndarray]
    file: str
    sha256: str
    tokens: int

    def describe(self) -> dict:
        return {"file": Path(self.file).name, "sha256": self.sha256, "tokens": self.tokens}


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, sha256 of the file's bytes); a missing or non-UTF-8 file names itself."""
    try:
        data = Path(path).read_bytes()
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the calibration text ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: the calibration text is not UTF-8") from None


def windows_of(text: str, tokenizer_json: str, bos: int | None, origin: str
               ) -> list[list[int]]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids
    step = WINDOW - (bos is not None)
    windows = [([bos] if bos is not None else []) + ids[i:i + step]
               for i in range(0, len(ids), step)][:MAX_WINDOWS]
    if len(windows) > 1 and len(windows[-1]) < len(windows[0]):
        # The text's last tokens as a full window (overlapping the one before), so every
        # window has one length and the pass runs them as one batch.
        windows[-1] = ([bos] if bos is not None else []) + ids[-step:]
    if len(windows[0]) < 16 if windows else True:
        raise InputError(f"{origin}: the calibration text has {len(ids)} tokens; at least 16 "
                         "are needed")
    return windows


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2], llama3 scaling applied when the config has it
    (other scalings, such as phi3's LongRoPE, get the plain frequencies: statistics only)."""
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > old / low, inv / factor, inv)
        smooth = (old / wavelength - low) / (high - low)
        medium = (wavelength >= old / high) & (wavelength <= old / low)
        inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _attention(q, k, v, config: ModelConfig) -> np.ndarray:
    """Causal GQA attention; q [W, T, Hq, D], k/v [W, T, Hkv, D] → [W, T, Hq·D]."""
    windows, tokens, heads, dim = q.shape
    group = heads // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("wthd,wshd->whts", q, k) / math.sqrt(dim)
    scores += np.triu(np.full((tokens, tokens), -np.inf, dtype=np.float32), 1)
    scores -= scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("whts,wshd->wthd", weights, v).reshape(windows, tokens, heads * dim)


def activation_statistics(config: ModelConfig, weights: WeightSource,
                          windows: list[list[int]], progress=None) -> dict[str, np.ndarray]:
    """Mean square per input channel of every linear layer's input over `windows` (token id
    lists of equal length), keyed by the checkpoint name of the layer's weight."""
    ids = np.asarray(windows)
    length = ids.shape[1]
    count = ids.size

    def load(name: str) -> np.ndarray:
        return weights.load(name).astype(np.float32)

    stats: dict[str, np.ndarray] = {}

    def record(names: list[str], x: np.ndarray) -> None:
        energy = (x.reshape(-1, x.shape[-1]).astype(np.float64) ** 2).sum(0) / count
        for name in names:
            stats[name] = energy.astype(np.float32)

    def linear(name: str, x: np.ndarray) -> np.ndarray:
        y = x @ load(f"{name}.weight").T
        bias = f"{name}.bias"
        return y + load(bias) if bias in index else y

    index = weights.index()
    h = load("model.embed_tokens.weight")[ids]
    positions = np.arange(length)[:, None] * rope_frequencies(config)[None, :]
    angles = np.concatenate([positions, positions], axis=-1)
    cos = np.cos(angles).astype(np.float32)[None, :, None, :]
    sin = np.sin(angles).astype(np.float32)[None, :, None, :]
    eps, dim = config.rms_norm_eps, config.head_dim
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        x = _rms_norm(h, load(f"{prefix}.input_layernorm.weight"), eps)
        attn = f"{prefix}.self_attn"
        record([f"{attn}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")], x)
        q = linear(f"{attn}.q_proj", x).reshape(*ids.shape, -1, dim)
        k = linear(f"{attn}.k_proj", x).reshape(*ids.shape, -1, dim)
        v = linear(f"{attn}.v_proj", x).reshape(*ids.shape, -1, dim)
        if config.qk_norm:  # qwen3: per-head RMSNorm before RoPE
            q = _rms_norm(q, load(f"{attn}.q_norm.weight"), eps)
            k = _rms_norm(k, load(f"{attn}.k_norm.weight"), eps)
        out = _attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, config)
        record([f"{attn}.o_proj.weight"], out)
        h = h + linear(f"{attn}.o_proj", out)
        x = _rms_norm(h, load(f"{prefix}.post_attention_layernorm.weight"), eps)
        mlp = f"{prefix}.mlp"
        record([f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"], x)
        gate = linear(f"{mlp}.gate_proj", x)
        inner = gate / (1 + np.exp(-gate)) * linear(f"{mlp}.up_proj", x)
        record([f"{mlp}.down_proj.weight"], inner)
        h = h + linear(f"{mlp}.down_proj", inner)
        if progress is not None:
            progress(layer + 1, config.num_hidden_layers)
    final = _rms_norm(h, load("model.norm.weight"), eps)
    output = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    record([output], final)
    return stats


def calibrate(config: ModelConfig, weights: WeightSource, tokenizer: dict, path: str,
              progress=None) -> Calibration:
    """Run `activation_statistics` over the text file at `path`."""
    if "tokenizer.json" not in tokenizer:
        raise InputError(f"{path}: --calib needs the model's tokenizer.json, and the model "
                         "has none (give one with --tokenizer)")
    text, digest = read_text(path)
    source = tokenizer["tokenizer.json"]
    tokenizer_json = source.decode() if isinstance(source, bytes) else \
        Path(source).read_text(encoding="utf-8")
    windows = windows_of(text, tokenizer_json, config.bos_token_id, path)
    importance = activation_statistics(config, weights, windows, progress)
    return Calibration(importance, str(path), digest, sum(len(w) for w in windows))
