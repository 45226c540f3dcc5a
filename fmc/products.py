"""What the compile phases hand each other: one typed, frozen product per phase.

    import    → ImportedModel     the checkpoint opened, the quantization plan bound to it
    quantize  → QuantizedModel    the exported Relax module and its stored-parameter plan
    fuse      → ModuleIR          the module after the fuse passes, with the plan they left
    lower     → ModuleIR          the scheduled, VM-lowered module codegen builds
    codegen   → Library           the library file, the parameters it takes, what was checked
    weights   → ConvertedWeights  the shards written and the tensors in them
    package   → Manifest          (fmc/artifacts/manifest.py)

The build cache stores and restores `Library` and `ConvertedWeights` whole (`to_dict` /
`from_dict`): a cache hit gives the later phases the same product a run would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fmc.quant.stored import StoredParam

if TYPE_CHECKING:
    from fmc.frontend import ModelSource
    from fmc.quant.plan import QuantPlan


@dataclass(frozen=True)
class ImportedModel:
    source: ModelSource  # config, lazy weights, tokenizer files
    plan: QuantPlan  # bound to the model's layers (and a GGUF input's stored types)
    compute_dtype: str  # activations and KV cache on this target
    context_window: int  # the runtime's default (--context-window, capped by the model)


@dataclass(frozen=True)
class QuantizedModel:
    mod: Any  # tvm.IRModule; carries its stored-parameter plan (fmc.lowering.param_plan)
    params: tuple[StoredParam, ...]  # the plan as exported, before any fusion
    layer_schemes: dict[str, str]  # layer → scheme
    local_shapes: dict[str, tuple[int, ...]]  # checkpoint tensor → one rank's shape
    entry_functions: tuple[str, ...]


@dataclass(frozen=True)
class ModuleIR:
    mod: Any  # tvm.IRModule
    params: tuple[StoredParam, ...]  # what the module's packed parameter tuple holds


@dataclass(frozen=True)
class Library:
    file: str  # in the artifact directory
    params: tuple[StoredParam, ...]  # the parameter list the library takes (post-fusion)
    entry_functions: tuple[str, ...]
    validation: dict[str, Any]  # what Target.validate checked (recorded in the manifest)

    def to_dict(self) -> dict[str, Any]:
        return {"library": self.file, "validation": self.validation,
                "params": [p.to_dict() for p in self.params],
                "entry_functions": list(self.entry_functions)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Library:
        return cls(data["library"], tuple(StoredParam.from_dict(p) for p in data["params"]),
                   tuple(data["entry_functions"]), data["validation"])


@dataclass(frozen=True)
class ConvertedWeights:
    tensors: tuple[dict[str, Any], ...]  # manifest tensor entries (StoredTensor's form)
    shards: tuple[dict[str, Any], ...]  # {"file", "sha256", "bytes"[, "rank"]}
    calibration: dict[str, Any] | None = None  # what --calib measured

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": list(self.tensors), "shards": list(self.shards),
                "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertedWeights:
        return cls(tuple(data["tensors"]), tuple(data["shards"]), data.get("calibration"))
