"""manifest.json: what an artifact holds and how to load it, with versions and hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmc.errors import ArtifactError

FORMAT = "fmc-artifact"
SCHEMA_VERSION = 1
# Bumped when the library's entry functions or calling convention change incompatibly.
ABI_VERSION = 1
MANIFEST = "manifest.json"


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON: sorted keys, fixed separators, trailing newline (reproducible bytes)."""
    return json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST
    if not Path(artifact).is_dir():
        raise ArtifactError(f"{artifact}: not an artifact directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (not an fmc artifact?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an fmc artifact manifest")
    abi = manifest.get("abi_version")
    if not isinstance(abi, int):
        raise ArtifactError(f"{path}: 'abi_version' is missing")
    if abi > ABI_VERSION:
        raise ArtifactError(f"{path}: ABI version {abi} is newer than this fmc supports "
                            f"({ABI_VERSION}); upgrade fmc")
    if abi < ABI_VERSION:
        raise ArtifactError(f"{path}: ABI version {abi} is older than this fmc's "
                            f"({ABI_VERSION}); recompile the artifact")
    _check_structure(path, manifest)
    return manifest


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
               list: "a list"}


def _field(path: Path, container: Any, dotted: str, kind: type) -> Any:
    """`container[a][b]…` for "a.b…", checked to be of `kind` (an int is never a bool)."""
    value = container
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ArtifactError(f"{path}: {dotted!r} is missing")
        value = value[part]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ArtifactError(f"{path}: {dotted!r} must be {_TYPE_NAMES[kind]}")
    return value


def _relative_file(path: Path, value: str, where: str) -> None:
    """Files the manifest names must stay inside the artifact directory."""
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts or "\0" in value:
        raise ArtifactError(f"{path}: {where} {value!r} is not a path inside the artifact")


def _file_entry(path: Path, entry: Any, where: str) -> None:
    _relative_file(path, _field(path, {"e": entry}, "e.file", str), f"{where}.file")
    _field(path, {"e": entry}, "e.sha256", str)
    if _field(path, {"e": entry}, "e.bytes", int) < 0:
        raise ArtifactError(f"{path}: {where}.bytes must not be negative")


def _check_structure(path: Path, manifest: dict[str, Any]) -> None:
    """Every field the loader and `fmc verify` read, with its type, so a damaged manifest is
    one clear error instead of a failure deep in loading."""
    from fmc.errors import InputError
    from fmc.model_config import ModelConfig

    _field(path, manifest, "target.name", str)
    _field(path, manifest, "quantization", dict)
    _file_entry(path, _field(path, manifest, "library", dict), "library")
    present = _field(path, manifest, "weights.present", bool)
    for i, shard in enumerate(_field(path, manifest, "weights.shards", list)):
        _file_entry(path, shard, f"weights.shards[{i}]")
    for key in ("context_window", "prefill_chunk_size", "page_size"):
        if _field(path, manifest, f"runtime.{key}", int) <= 0:
            raise ArtifactError(f"{path}: 'runtime.{key}' must be positive")
    ranks = 1
    if "tensor_parallel" in manifest:
        ranks = _field(path, manifest, "tensor_parallel.ranks", int)
        if ranks < 1:
            raise ArtifactError(f"{path}: 'tensor_parallel.ranks' must be positive")
    for i, entry in enumerate(_field(path, manifest, "params", list)):
        where = {"e": entry}
        _field(path, where, "e.name", str)
        _field(path, where, "e.dtype", str)
        shape = _field(path, where, "e.shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ArtifactError(f"{path}: params[{i}].shape must be a list of sizes")
        if present:
            _relative_file(path, _field(path, where, "e.shard", str), f"params[{i}].shard")
        if ranks > 1 and present:
            per_rank = _field(path, where, "e.ranks", list)
            if len(per_rank) != ranks:
                raise ArtifactError(f"{path}: params[{i}].ranks must list {ranks} ranks")
            for rank, location in enumerate(per_rank):
                _relative_file(path, _field(path, {"e": location}, "e.shard", str),
                               f"params[{i}].ranks[{rank}].shard")
    try:
        ModelConfig.from_dict(_field(path, manifest, "model", dict)).validate(f"{path}: model")
    except InputError as exc:
        raise ArtifactError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: 'model' is invalid ({exc})") from None
