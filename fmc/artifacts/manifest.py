"""manifest.json: what an artifact holds and how to load it, with versions and hashes.

`Manifest` is the typed form of the file and the only code that knows its keys: the
compiler builds one and writes `to_json()`, everything else reads `read_manifest(dir)` or
`Manifest.from_json(...)` and uses fields. Reading validates every field the loader and
`fmc verify` depend on (one ArtifactError naming manifest.json and the dotted field), and
keeps keys it does not know, so a manifest from another fmc version round-trips."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmc.artifacts.abi import ABI_VERSION
from fmc.errors import ArtifactError, InputError
from fmc.model_config import ModelConfig

FORMAT = "fmc-artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
               list: "a list"}


def _is(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is never an integer."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


class _Object:
    """One JSON object being read: typed fields by key, errors naming the file and the
    field's dotted path; `rest()` is what was not read (kept so it round-trips)."""

    def __init__(self, origin: str, where: str, data: Any):
        # A missing or non-object parent reads as empty: the error then names the field
        # that was needed ('weights.present' is missing), as a dotted lookup would.
        self.origin, self.where = origin, where
        self.data = data if isinstance(data, dict) else {}
        self.read: set[str] = set()

    def dotted(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.origin}: {self.dotted(key)!r} {problem}")

    def required(self, key: str, kind: type) -> Any:
        self.read.add(key)
        if key not in self.data:
            raise self.fail(key, "is missing")
        return self._typed(key, kind)

    def optional(self, key: str, kind: type, default: Any = None) -> Any:
        """`default` when absent or null (fields not every fmc writes)."""
        self.read.add(key)
        if self.data.get(key) is None:
            return default
        return self._typed(key, kind)

    def _typed(self, key: str, kind: type) -> Any:
        value = self.data[key]
        if not _is(value, kind):
            raise self.fail(key, f"must be {_TYPE_NAMES[kind]}")
        return value

    def child(self, key: str) -> _Object:
        self.read.add(key)
        return _Object(self.origin, self.dotted(key), self.data.get(key))

    def optional_child(self, key: str) -> _Object | None:
        """The object at `key`, or None when absent or null."""
        return None if self.optional(key, dict) is None else self.child(key)

    def items(self, key: str, required: bool = True) -> Iterator[_Object]:
        """Each object of the list at `key`, read as `key[i]`."""
        values = self.required(key, list) if required else self.optional(key, list, [])
        for i, value in enumerate(values):
            yield _Object(self.origin, f"{self.dotted(key)}[{i}]", value)

    def strings(self, key: str) -> tuple[str, ...]:
        values = self.optional(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise self.fail(key, "must be a list of strings")
        return tuple(values)

    def positive(self, key: str) -> int:
        value = self.required(key, int)
        if value <= 0:
            raise ArtifactError(f"{self.origin}: '{self.dotted(key)}' must be positive")
        return value

    def relative_file(self, key: str) -> str:
        """A file the manifest names: it must stay inside the artifact directory."""
        value = self.required(key, str)
        parts = Path(value).parts
        if not value or Path(value).is_absolute() or ".." in parts or "\0" in value:
            raise ArtifactError(f"{self.origin}: {self.dotted(key)} {value!r} is not a path "
                                "inside the artifact")
        return value

    def model(self, key: str) -> ModelConfig:
        self.read.add(key)
        try:
            return ModelConfig.from_dict(self.data[key])
        except InputError as exc:  # "config: <problem>": the problem, named here
            raise self.fail(key, f"is invalid ({str(exc).split(': ', 1)[-1]})") from None
        except (TypeError, ValueError) as exc:
            raise self.fail(key, f"is invalid ({exc})") from None

    def rest(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in self.read}


def _without_none(**values: Any) -> dict[str, Any]:
    """The keys some fmc versions or some artifacts leave out: written only when set."""
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class FileEntry:
    """A file of the artifact and its hash: the library, or a weight shard."""

    file: str
    sha256: str
    bytes: int
    rank: int | None = None  # a tensor-parallel shard: the rank whose weights it holds
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "file": self.file, "sha256": self.sha256, "bytes": self.bytes,
                **_without_none(rank=self.rank)}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> FileEntry:
        """From a ShardWriter shard entry (the same fields)."""
        return cls.read(_Object(MANIFEST, "weights.shards[]", entry))

    @classmethod
    def read(cls, o: _Object) -> FileEntry:
        file = o.relative_file("file")
        sha256 = o.required("sha256", str)
        size = o.required("bytes", int)
        if size < 0:
            raise ArtifactError(f"{o.origin}: {o.where}.bytes must not be negative")
        return cls(file, sha256, size, o.optional("rank", int), o.rest())


@dataclass(frozen=True)
class StoredTensor:
    """Where one rank's copy of a parameter lies: its shard, hash and size."""

    shard: str
    sha256: str = ""
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> StoredTensor:
        """From a ShardWriter tensor entry (which also names the tensor, shape and dtype)."""
        return cls.read(_Object(MANIFEST, "params[]", entry), check_shard=True)

    @classmethod
    def read(cls, o: _Object, check_shard: bool) -> StoredTensor:
        shard = o.relative_file("shard") if check_shard else o.required("shard", str)
        return cls(shard, o.optional("sha256", str, ""), o.optional("bytes", int, 0))


@dataclass(frozen=True)
class FusedPart:
    """Rows [start, end) of a horizontally fused parameter and the tensor they come from."""

    name: str
    source: str
    part: int
    rows: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "part": self.part,
                "rows": list(self.rows)}

    @classmethod
    def read(cls, o: _Object) -> FusedPart:
        rows = o.required("rows", list)
        if len(rows) != 2 or not all(_is(r, int) for r in rows):
            raise o.fail("rows", "must be [start, end]")
        return cls(o.required("name", str), o.required("source", str),
                   o.required("part", int), (rows[0], rows[1]))


@dataclass(frozen=True)
class Param:
    """One parameter of the library, in call order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str | None  # the checkpoint tensor; None when fused from several (fused_from)
    scheme: str | None  # quantization scheme; None for plain casts
    stored: StoredTensor | None = None  # rank 0's copy; None in a weights-free artifact
    fused_from: tuple[FusedPart, ...] | None = None
    sharding: dict[str, Any] | None = None  # tensor-parallel: how ranks split it
    ranks: tuple[StoredTensor, ...] | None = None  # tensor-parallel: every rank's copy
    extra: dict[str, Any] = field(default_factory=dict)

    def location(self, rank: int = 0) -> StoredTensor:
        return self.ranks[rank] if self.ranks is not None else self.stored

    @property
    def signature(self) -> list:
        """[name, shape, dtype]: how the library's own metadata lists it."""
        return [self.name, list(self.shape), self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "shape": list(self.shape),
                "dtype": self.dtype, "source": self.source, "scheme": self.scheme,
                **(self.stored.to_dict() if self.stored else {}),
                **_without_none(
                    fused_from=None if self.fused_from is None else
                    [p.to_dict() for p in self.fused_from],
                    sharding=self.sharding,
                    ranks=None if self.ranks is None else [r.to_dict() for r in self.ranks])}

    @classmethod
    def read(cls, o: _Object, i: int, present: bool, ranks: int) -> Param:
        name = o.required("name", str)
        dtype = o.required("dtype", str)
        shape = o.required("shape", list)
        if not all(_is(d, int) and d >= 0 for d in shape):
            raise ArtifactError(f"{o.origin}: params[{i}].shape must be a list of sizes")
        stored = StoredTensor.read(o, present) if present or "shard" in o.data else None
        per_rank = None
        if ranks > 1 and present:
            listed = list(o.items("ranks"))
            if len(listed) != ranks:
                raise ArtifactError(f"{o.origin}: params[{i}].ranks must list {ranks} ranks")
            per_rank = tuple(StoredTensor.read(r, True) for r in listed)
        elif "ranks" in o.data:
            per_rank = tuple(StoredTensor.read(r, False) for r in o.items("ranks"))
        fused = tuple(FusedPart.read(p) for p in o.items("fused_from", required=False)) \
            if o.data.get("fused_from") is not None else None
        return cls(name, tuple(shape), dtype, o.optional("source", str),
                   o.optional("scheme", str), stored, fused,
                   o.optional("sharding", dict), per_rank, o.rest())


@dataclass(frozen=True)
class TargetInfo:
    """What the library was built for; `describe` keeps the target plugin's own facts."""

    name: str
    spec: str | None = None  # what was asked for (cpu:aarch64-linux, cuda:sm_80, …)
    tvm_target: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)  # host tool → its --version
    validation: dict[str, Any] = field(default_factory=dict)  # what Target.validate checked
    # The target plugin's own build facts (Target.describe_build: cpu_dot, cuda_archs, …).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requested(self) -> str:
        """The target spec to resolve it by (older manifests record only the name)."""
        return self.spec or self.name

    @property
    def tvm_kind(self) -> str | None:
        return self.tvm_target.get("kind")

    @property
    def device_kind(self) -> str | None:
        """The kind of device the library runs on (cpu, cuda, vulkan, metal); None for a
        CPU library built for another OS or architecture."""
        if self.tvm_kind == "llvm":
            return None if self.extra.get("cross") else "cpu"
        return self.tvm_kind

    @property
    def cpu_dot(self) -> str | None:
        """CPU targets: how quantized matmuls multiply ("float" or "int8")."""
        return self.extra.get("cpu_dot")

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "tvm_target": self.tvm_target,
                "tools": self.tools, "validation": self.validation,
                **_without_none(spec=self.spec)}

    @classmethod
    def read(cls, o: _Object) -> TargetInfo:
        return cls(o.required("name", str), o.optional("spec", str),
                   o.optional("tvm_target", dict, {}), o.optional("tools", dict, {}),
                   o.optional("validation", dict, {}), o.rest())

    @classmethod
    def described(cls, description: dict[str, Any], validation: dict[str, Any]) -> TargetInfo:
        """From `Target.describe()` and what its validation checked (at compile time)."""
        return cls.read(_Object(MANIFEST, "target", {**description, "validation": validation}))


@dataclass(frozen=True)
class Calibration:
    """The --calib text the quantizers' error was weighted by."""

    file: str
    sha256: str
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "tokens": self.tokens}

    @classmethod
    def read(cls, o: _Object) -> Calibration:
        return cls(o.required("file", str), o.required("sha256", str),
                   o.required("tokens", int))


@dataclass(frozen=True)
class Quantization:
    default: str
    overrides: tuple[str, ...] = ()
    layers: dict[str, str] = field(default_factory=dict)  # layer → scheme it was stored in
    row_block: int | None = None  # rows interleaved by the target's layout; None: row-major
    recipe: dict[str, Any] | None = None  # the recipe the default names, rule by rule
    calibration: Calibration | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "default": self.default, "overrides": list(self.overrides),
                "layers": self.layers, "row_block": self.row_block,
                **_without_none(recipe=self.recipe,
                                calibration=self.calibration and self.calibration.to_dict())}

    @classmethod
    def read(cls, o: _Object) -> Quantization:
        calibration = o.optional_child("calibration")
        return cls(o.optional("default", str, ""), o.strings("overrides"),
                   o.optional("layers", dict, {}), o.optional("row_block", int),
                   o.optional("recipe", dict),
                   calibration and Calibration.read(calibration), o.rest())

    @classmethod
    def described(cls, plan: dict[str, Any], layers: dict[str, str], row_block: int | None,
                  calibration: dict[str, Any] | None) -> Quantization:
        """From `QuantPlan.describe()` and what the quantize and weights phases chose."""
        return cls.read(_Object(MANIFEST, "quantization", {
            **plan, "layers": layers, "row_block": row_block, "calibration": calibration}))


@dataclass(frozen=True)
class RuntimeSettings:
    """The KV cache the runtime creates unless told otherwise."""

    context_window: int
    prefill_chunk_size: int
    page_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "context_window": self.context_window,
                "prefill_chunk_size": self.prefill_chunk_size, "page_size": self.page_size}

    @classmethod
    def read(cls, o: _Object) -> RuntimeSettings:
        return cls(o.positive("context_window"), o.positive("prefill_chunk_size"),
                   o.positive("page_size"), o.rest())


@dataclass(frozen=True)
class Weights:
    present: bool  # False: a weights-free artifact (a preset compiled without --weights)
    shards: tuple[FileEntry, ...] = ()
    shard_size_limit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "present": self.present,
                "shards": [s.to_dict() for s in self.shards],
                "shard_size_limit": self.shard_size_limit}


@dataclass(frozen=True)
class Collectives:
    """The collective calls one forward step of a tensor-parallel library issues."""

    allreduce_sum_per_step: int
    function: str

    def to_dict(self) -> dict[str, Any]:
        return {"allreduce_sum_per_step": self.allreduce_sum_per_step,
                "function": self.function}

    @classmethod
    def read(cls, o: _Object) -> Collectives:
        return cls(o.required("allreduce_sum_per_step", int), o.required("function", str))


@dataclass(frozen=True)
class TensorParallel:
    ranks: int
    local_model: ModelConfig | None = None  # what one rank computes
    collectives: Collectives | None = None
    weights_dir: str | None = None  # each rank's shard directory ("{rank}" substituted)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "ranks": self.ranks, **_without_none(
            local_model=self.local_model and self.local_model.to_dict(),
            collectives=self.collectives and self.collectives.to_dict(),
            weights_dir=self.weights_dir)}

    @classmethod
    def read(cls, o: _Object) -> TensorParallel:
        ranks = o.required("ranks", int)
        if ranks < 1:
            raise ArtifactError(f"{o.origin}: 'tensor_parallel.ranks' must be positive")
        collectives = o.optional_child("collectives")
        return cls(ranks, o.model("local_model") if "local_model" in o.data else None,
                   collectives and Collectives.read(collectives),
                   o.optional("weights_dir", str), o.rest())


@dataclass(frozen=True)
class MemoryEstimate:
    """What running the artifact holds in memory (per rank when tensor-parallel)."""

    weights_bytes: int
    kv_cache_bytes: int  # for `context_window` tokens across all sequences
    workspace_bytes: int  # activations of one prefill chunk and one logits row
    total_bytes: int
    context_window: int
    ranks: int | None = None
    all_ranks_bytes: int | None = None
    # A mixture of experts: the weights one token's forward reads (its experts only).
    active_weights_bytes: int | None = None
    # Layers attending within a window (gemma2/3): the KV cache for one sequence of
    # `context_window` tokens if those layers kept only their window (its last window − 1
    # keys and one prefill chunk's). fmc's cache keeps every layer at full length
    # (`kv_cache_bytes`): TVM 0.27's paged cache has one page table for all layers.
    windowed_kv_cache_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "workspace_bytes": self.workspace_bytes, "total_bytes": self.total_bytes,
                "context_window": self.context_window,
                **_without_none(ranks=self.ranks, all_ranks_bytes=self.all_ranks_bytes,
                                active_weights_bytes=self.active_weights_bytes,
                                windowed_kv_cache_bytes=self.windowed_kv_cache_bytes)}

    @classmethod
    def read(cls, o: _Object) -> MemoryEstimate:
        return cls(*(o.required(key, int) for key in (
            "weights_bytes", "kv_cache_bytes", "workspace_bytes", "total_bytes",
            "context_window")), o.optional("ranks", int), o.optional("all_ranks_bytes", int),
            o.optional("active_weights_bytes", int), o.optional("windowed_kv_cache_bytes", int))


@dataclass(frozen=True)
class Source:
    """The model reference the artifact was compiled from."""

    kind: str  # hf-dir | hub | gguf | preset
    reference: str
    weights: bool
    extra: dict[str, Any] = field(default_factory=dict)
    # A hub model: the revision asked for (absent: the default branch) and the commit it
    # resolved to, which pins exactly which files were compiled.
    revision: str | None = None
    commit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "kind": self.kind, "reference": self.reference,
                "weights": self.weights,
                **_without_none(revision=self.revision, commit=self.commit)}

    @classmethod
    def read(cls, o: _Object) -> Source:
        return cls(o.optional("kind", str, ""), o.optional("reference", str, ""),
                   o.optional("weights", bool, False),
                   revision=o.optional("revision", str), commit=o.optional("commit", str),
                   extra=o.rest())

    @classmethod
    def described(cls, description: dict[str, Any]) -> Source:
        """From `ModelSource.describe()`."""
        return cls.read(_Object(MANIFEST, "source", description))


@dataclass(frozen=True)
class Manifest:
    target: TargetInfo
    library: FileEntry
    quantization: Quantization
    compute_dtype: str
    model: ModelConfig
    runtime: RuntimeSettings
    weights: Weights
    params: tuple[Param, ...]
    source: Source
    entry_functions: tuple[str, ...] = ()
    tokenizer: tuple[str, ...] = ()  # files under tokenizer/
    memory: MemoryEstimate | None = None
    tensor_parallel: TensorParallel | None = None  # None: one device
    fmc_version: str = ""
    tvm_version: str = ""
    abi_version: int = ABI_VERSION
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # keys this fmc does not know

    @property
    def ranks(self) -> int:
        return self.tensor_parallel.ranks if self.tensor_parallel else 1

    @property
    def files(self) -> list[FileEntry]:
        """Every hashed file: the library, then the weight shards."""
        return [self.library, *self.weights.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "format": self.format,
            "schema_version": self.schema_version,
            "abi_version": self.abi_version,
            "fmc_version": self.fmc_version,
            "tvm_version": self.tvm_version,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "library": self.library.to_dict(),
            "quantization": self.quantization.to_dict(),
            "compute_dtype": self.compute_dtype,
            "model": self.model.to_dict(),
            "runtime": self.runtime.to_dict(),
            "entry_functions": list(self.entry_functions),
            "weights": self.weights.to_dict(),
            "params": [p.to_dict() for p in self.params],
            "tokenizer": list(self.tokenizer),
            **_without_none(memory=self.memory and self.memory.to_dict(),
                            tensor_parallel=self.tensor_parallel and
                            self.tensor_parallel.to_dict()),
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, fixed separators, trailing newline (reproducible
        bytes)."""
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, source: Path | str) -> Manifest:
        """From a manifest file (a Path) or its text (a str); refuses another format, another
        ABI version and any field the loader would trip over."""
        if isinstance(source, Path):
            origin = str(source)
            try:
                text = source.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ArtifactError(f"{source}: missing (not an fmc artifact?)") from None
            except UnicodeDecodeError as exc:
                raise ArtifactError(f"{source}: corrupt ({exc})") from None
        else:
            origin, text = MANIFEST, source
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{origin}: corrupt ({exc})") from None
        return cls.from_dict(data, origin)

    @classmethod
    def from_dict(cls, data: Any, origin: str = MANIFEST) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{origin}: not an fmc artifact manifest")
        abi = data.get("abi_version")
        if not _is(abi, int):
            raise ArtifactError(f"{origin}: 'abi_version' is missing")
        if abi > ABI_VERSION:
            raise ArtifactError(f"{origin}: ABI version {abi} is newer than this fmc supports "
                                f"({ABI_VERSION}); upgrade fmc")
        if abi < ABI_VERSION:
            raise ArtifactError(f"{origin}: ABI version {abi} is older than this fmc's "
                                f"({ABI_VERSION}); recompile the artifact")
        top = _Object(origin, "", data)
        top.read.update(("format", "abi_version"))
        # In the order the fields were always checked, so a manifest damaged in several
        # places reports the same field first.
        target = TargetInfo.read(top.child("target"))
        top.required("quantization", dict)
        quantization = Quantization.read(top.child("quantization"))
        top.required("library", dict)
        library = FileEntry.read(top.child("library"))
        weights_object = top.child("weights")
        present = weights_object.required("present", bool)
        shards = tuple(FileEntry.read(s) for s in weights_object.items("shards"))
        weights = Weights(present, shards, weights_object.optional("shard_size_limit", int, 0),
                          weights_object.rest())
        runtime = RuntimeSettings.read(top.child("runtime"))
        tensor_parallel = TensorParallel.read(top.child("tensor_parallel")) \
            if "tensor_parallel" in data else None
        ranks = tensor_parallel.ranks if tensor_parallel else 1
        params = tuple(Param.read(p, i, present, ranks)
                       for i, p in enumerate(top.items("params")))
        top.required("model", dict)
        model = top.model("model")
        memory = top.optional_child("memory")
        return cls(
            target=target, library=library, quantization=quantization,
            compute_dtype=top.optional("compute_dtype", str, ""), model=model,
            runtime=runtime, weights=weights, params=params,
            source=Source.read(top.child("source")),
            entry_functions=top.strings("entry_functions"), tokenizer=top.strings("tokenizer"),
            memory=memory and MemoryEstimate.read(memory),
            tensor_parallel=tensor_parallel, fmc_version=top.optional("fmc_version", str, ""),
            tvm_version=top.optional("tvm_version", str, ""), abi_version=abi,
            schema_version=top.optional("schema_version", int, SCHEMA_VERSION),
            format=FORMAT, extra=top.rest())


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON: sorted keys, fixed separators, trailing newline (reproducible bytes)."""
    return json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(artifact: Path | str) -> Manifest:
    """The manifest of the artifact directory `artifact`."""
    if not Path(artifact).is_dir():
        raise ArtifactError(f"{artifact}: not an artifact directory")
    return Manifest.from_json(Path(artifact) / MANIFEST)
