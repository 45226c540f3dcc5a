"""Load a Hugging Face model directory: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from fmc.errors import InputError
from fmc.frontend.architectures import config_from_hf
from fmc.frontend.safetensors_reader import SafetensorsFile
from fmc.frontend.weights import TensorInfo
from fmc.model_config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Files copied into the artifact so the runtime can tokenize and apply chat templates.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
)


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


class SafetensorsWeights:
    """The tensors of one or more safetensors files, under the checkpoint's own names."""

    def __init__(self, paths: list[Path]):
        self._files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        self._index: dict[str, TensorInfo] = {}
        for shard in self._files:
            for name, info in shard.index().items():
                if name in self._index:
                    raise InputError(f"{shard.path}: tensor {name!r} also appears in "
                                     f"{self._index[name].file}")
                self._where[name] = shard
                self._index[name] = info

    def index(self) -> dict[str, TensorInfo]:
        return dict(self._index)

    def load(self, name: str) -> np.ndarray:
        return self._where[name].load(name)

    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def close(self) -> None:
        for shard in self._files:
            shard.close()


def _weight_files(directory: Path) -> list[Path]:
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: 'weight_map' is missing or empty")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise InputError(f"{index_path}: names shard {missing[0]!r}, which does not exist")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt*"))
        hint = (f" (found {other[0]}: convert it to safetensors first)" if other else "")
        raise InputError(f"{directory}: no *.safetensors weights{hint}")
    return files


def load_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    config = config_from_hf(read_json(path), str(path))
    generation = directory / "generation_config.json"
    if generation.exists():
        data = read_json(generation)
        extra = data.get("eos_token_id") if isinstance(data, dict) else None
        extra_ids = extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra_ids]))
        if merged != config.eos_token_ids:
            config = replace(config, eos_token_ids=merged)
    return config


def tokenizer_files(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def open_hf_dir(directory: Path, with_weights: bool = True):
    """Return (config, weights or None, tokenizer files, every input file read)."""
    config = load_config(directory)
    weights = SafetensorsWeights(_weight_files(directory)) if with_weights else None
    tokenizer = tokenizer_files(directory)
    inputs = [directory / "config.json", *tokenizer.values()]
    if (directory / INDEX_FILE).exists():
        inputs.append(directory / INDEX_FILE)
    if weights is not None:
        inputs.extend(weights.files())
    return config, weights, tokenizer, inputs
