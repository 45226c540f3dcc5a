"""Load a Hugging Face model directory: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from fmc.artifacts.safetensors_reader import SafetensorsFile
from fmc.errors import InputError
from fmc.frontend.architectures import config_from_hf
from fmc.frontend.tokenizer_files import tokenizer_files
from fmc.frontend.weights import TensorInfo
from fmc.model_config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


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


class RenamedWeights:
    """A weight source under the model's parameter names, where a family's checkpoint names
    differ (`Architecture.hf_weight_names`)."""

    def __init__(self, source, rename):
        self.source = source
        self._names = {rename(name): name for name in source.index()}

    def index(self) -> dict[str, TensorInfo]:
        index = self.source.index()
        return {new: replace(index[old], name=new) for new, old in self._names.items()}

    def load(self, name: str) -> np.ndarray:
        return self.source.load(self._names[name])

    def files(self) -> list[Path]:
        return self.source.files()


class StackedWeights:
    """A weight source where the checkpoint's numbered children of the `modules`
    (`….experts.<i>.<rest>`, i = 0…E−1) are one tensor `….experts.<rest>` [E, …], stacked
    when loaded (`Architecture.hf_stacked`: mixture-of-experts weights)."""

    def __init__(self, source, modules: tuple[str, ...]):
        self.source = source
        alternatives = "|".join(re.escape(m) for m in modules)
        pattern = re.compile(rf"^(?P<head>(?:.*\.)?(?:{alternatives}))\.(?P<i>\d+)\.(?P<tail>.+)$")
        index = source.index()
        groups: dict[tuple[str, str], dict[int, str]] = {}
        self._index: dict[str, TensorInfo] = {}
        for name, info in index.items():
            match = pattern.match(name)
            if match is None:
                self._index[name] = info
            else:
                groups.setdefault((match["head"], match["tail"]), {})[int(match["i"])] = name
        self._members: dict[str, list[str]] = {}
        for (head, tail), members in sorted(groups.items()):
            stacked = f"{head}.{tail}"
            first = index[members[min(members)]]
            absent = next((i for i in range(len(members)) if i not in members), None)
            if absent is not None:
                raise InputError(f"{first.file}: tensor {f'{head}.{absent}.{tail}'!r} is "
                                 f"missing from the checkpoint ({stacked!r} stacks experts "
                                 f"0…{max(members)})")
            for i in sorted(members):
                info = index[members[i]]
                if (info.shape, info.dtype) != (first.shape, first.dtype):
                    raise InputError(f"{info.file}: tensor {info.name!r} is {info.dtype}"
                                     f"{list(info.shape)}, unlike {first.name!r} "
                                     f"({first.dtype}{list(first.shape)})")
            self._members[stacked] = [members[i] for i in range(len(members))]
            self._index[stacked] = replace(first, name=stacked,
                                           shape=(len(members), *first.shape))

    def index(self) -> dict[str, TensorInfo]:
        return dict(self._index)

    def load(self, name: str) -> np.ndarray:
        members = self._members.get(name)
        if members is None:
            return self.source.load(name)
        return np.stack([self.source.load(member) for member in members])

    def files(self) -> list[Path]:
        return self.source.files()


def open_hf_dir(directory: Path, with_weights: bool = True):
    """Return (config, weights or None, tokenizer files, every input file read)."""
    from fmc.frontend.archs import registry

    config = load_config(directory)
    weights = SafetensorsWeights(_weight_files(directory)) if with_weights else None
    arch = registry.get(config.architecture)
    if weights is not None and arch.hf_weight_names:
        weights = RenamedWeights(weights, arch.hf_name)
    if weights is not None and arch.fused_weights:
        from fmc.frontend.fused_weights import SplitFusedWeights

        weights = SplitFusedWeights(weights, arch.fused_weights, config)
    if weights is not None and arch.hf_stacked:
        weights = StackedWeights(weights, arch.hf_stacked)
    tokenizer = tokenizer_files(directory)
    inputs = [directory / "config.json", *tokenizer.values()]
    if (directory / INDEX_FILE).exists():
        inputs.append(directory / INDEX_FILE)
    if weights is not None:
        inputs.extend(weights.files())
    return config, weights, tokenizer, inputs
