"""Tensor parallelism, the data side: how a Llama-family checkpoint splits across N ranks.

Megatron-style: q/k/v and gate/up are column-parallel (each rank holds a contiguous block of
output rows: its attention heads, its KV heads, its slice of the MLP), o_proj and down_proj
are row-parallel (each rank holds the matching block of input columns; the ranks' partial
outputs are summed by an all-reduce). Embeddings, norms and the output layer are replicated.
A row-parallel bias is added once, after the sum: rank 0 holds it, the others hold zeros.
Heads are split contiguously, so rank r's query heads use exactly rank r's KV heads (GQA).

Weights are sharded at the checkpoint level — `ShardedWeights` presents rank r's local
tensors to the unchanged quantize/convert pipeline, run once per rank with `local_config` —
so quantized weights are sharded consistently with their scales by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmc.errors import UsageError
from fmc.frontend.weights import TensorInfo, WeightSource
from fmc.model_config import ModelConfig

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# Stacked experts ([experts, out, in], under `experts`): every expert's width splits like
# the dense MLP's, one axis further in; Mixtral names them w1/w3 (gate/up) and w2 (down).
EXPERTS = "experts"
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class Sharding:
    """How one checkpoint tensor is laid out across ranks."""

    axis: int | None  # split along this axis into equal contiguous blocks; None = replicated
    rank0_only: bool = False  # a row-parallel bias: rank 0 holds it, the others zeros

    def describe(self) -> dict:
        return {"axis": self.axis, "rank0_only": self.rank0_only}


def check_divisible(config: ModelConfig, ranks: int) -> None:
    """Every split must be whole: heads, KV heads and the MLP width."""
    if ranks < 1:
        raise UsageError(f"--tensor-parallel must be ≥ 1, got {ranks}")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key)
        if value % ranks:
            raise UsageError(f"--tensor-parallel {ranks} does not divide {key} ({value})")


def local_config(config: ModelConfig, ranks: int) -> ModelConfig:
    """The model one rank computes: its heads, KV heads and MLP slice; hidden size whole."""
    check_divisible(config, ranks)
    return dataclasses.replace(config,
                               num_attention_heads=config.num_attention_heads // ranks,
                               num_key_value_heads=config.num_key_value_heads // ranks,
                               intermediate_size=config.intermediate_size // ranks)


def sharding_of(name: str) -> Sharding:
    """The sharding of a checkpoint tensor, from its (Hugging Face Llama) name."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if len(parts) >= 3 and parts[-3] == EXPERTS and parts[-1] == "weight":
        module = EXPERT_NAMES.get(module, module)
        if module in COLUMN_PARALLEL:
            return Sharding(axis=1)
        if module in ROW_PARALLEL:
            return Sharding(axis=2)
    if module in COLUMN_PARALLEL:
        return Sharding(axis=0)  # weight rows and bias entries are output features
    if module in ROW_PARALLEL:
        return Sharding(axis=1) if parts[-1] == "weight" else Sharding(None, rank0_only=True)
    return Sharding(None)


def shard(array: np.ndarray, sharding: Sharding, rank: int, ranks: int) -> np.ndarray:
    """Rank `rank`'s part of a full tensor."""
    if sharding.rank0_only:
        return array if rank == 0 else np.zeros_like(array)
    if sharding.axis is None:
        return array
    size = array.shape[sharding.axis]
    if size % ranks:
        raise UsageError(f"cannot split a dimension of {size} into {ranks} equal parts")
    block = size // ranks
    index = [slice(None)] * array.ndim
    index[sharding.axis] = slice(rank * block, (rank + 1) * block)
    return np.ascontiguousarray(array[tuple(index)])


def shard_importance(name: str, importance: np.ndarray, rank: int, ranks: int) -> np.ndarray:
    """Rank `rank`'s part of a weight's per-input-channel importance: split like the weight's
    input axis (row-parallel layers), else whole."""
    if sharding_of(name).axis == 1:
        return shard(importance, Sharding(axis=0), rank, ranks)
    return importance


def unshard(parts: list[np.ndarray], sharding: Sharding) -> np.ndarray:
    """The full tensor from every rank's part (the inverse of `shard`)."""
    if sharding.rank0_only or sharding.axis is None:
        return parts[0]
    return np.concatenate(parts, axis=sharding.axis)


def param_sharding(param, local_shapes: dict[str, tuple[int, ...]], ranks: int) -> dict:
    """How a stored parameter (`fmc.quant.convert.StoredParam`) relates across ranks, in the
    stored layout (a quantized part's axes, not the checkpoint's), for the manifest:

    - `{"axis": a}`: each rank holds a contiguous block along axis a of the whole tensor;
      `"stacked": true` for a horizontally fused parameter (each rank stacks its blocks of
      the members: split by the manifest's `fused_from` rows before concatenating);
    - `{"axis": null}`: replicated; `"rank0_only": true`: rank 0 holds it, the others zeros;
    - `{"axis": null, "per_rank": true}`: each rank's own, not a slice of a whole tensor —
      e.g. per-row scales of a row-parallel weight, computed from the rank's columns."""
    from fmc.quant import experts, registry

    member = param.members[0] if param.members else param
    source = sharding_of(member.source)
    if source.rank0_only or source.axis is None:
        return source.describe()
    local = tuple(local_shapes[member.source])
    whole = list(local)
    whole[source.axis] *= ranks
    if member.scheme:
        scheme = registry.get(member.scheme)
        local = experts.storage(scheme, local, member.source)[member.part].shape
        whole = experts.storage(scheme, tuple(whole), member.source)[member.part].shape
    split = [axis for axis, (a, b) in enumerate(zip(local, whole, strict=True)) if a != b]
    if not split:
        return {"axis": None, "rank0_only": False, "per_rank": True}
    return {"axis": split[0], "rank0_only": False, **({"stacked": True} if param.members else {})}


def unshard_stored(entry, parts: list[np.ndarray]) -> np.ndarray | None:
    """The whole stored tensor from every rank's part, following a manifest parameter's
    (`fmc.artifacts.manifest.Param`) `sharding` (see `param_sharding`); None where each
    rank's tensor is its own."""
    sharding = entry.sharding
    if sharding.get("per_rank"):
        return None
    if sharding["axis"] is None:
        return parts[0]
    axis = sharding["axis"]
    if not sharding.get("stacked"):
        return np.concatenate(parts, axis=axis)
    # A fused parameter: each rank stacks its block of every member; members' `rows` are
    # checkpoint rows, scaled to the stored axis (row-interleaved storage holds rows/B).
    rows = [member.rows for member in entry.fused_from]
    scale = parts[0].shape[axis] / rows[-1][1]
    members = []
    for start, end in rows:
        index = [slice(None)] * parts[0].ndim
        index[axis] = slice(int(start * scale), int(end * scale))
        members.append(np.concatenate([part[tuple(index)] for part in parts], axis=axis))
    return np.concatenate(members, axis=axis)


class ShardedWeights:
    """Rank `rank`'s view of a weight source: the same names, local shapes and data."""

    def __init__(self, source: WeightSource, rank: int, ranks: int):
        if not 0 <= rank < ranks:
            raise UsageError(f"rank {rank} is outside 0..{ranks - 1}")
        self.source, self.rank, self.ranks = source, rank, ranks

    def index(self) -> dict[str, TensorInfo]:
        local = {}
        for name, info in self.source.index().items():
            shape = list(info.shape)
            axis = sharding_of(name).axis
            if axis is not None:
                if shape[axis] % self.ranks:
                    raise UsageError(f"{info.file}: tensor {name!r} has {shape[axis]} along "
                                     f"axis {axis}, not divisible by {self.ranks} ranks")
                shape[axis] //= self.ranks
            local[name] = dataclasses.replace(info, shape=tuple(shape))
        return local

    def load(self, name: str) -> np.ndarray:
        return shard(self.source.load(name), sharding_of(name), self.rank, self.ranks)

    def files(self) -> list[Path]:
        return self.source.files()
