"""Session files: a sequence's KV state on disk (save, restore, `fmc chat --session`).

The pages come from `PagedCache.export` (fmc.runtime.kv_cache): page groups, one per layer
([1, pages, 2, kv_heads, page_size, head_dim] holding the rotated keys and the values; a
tensor-parallel engine's stacked along a leading rank axis) plus TVM's JSON description.
A session file is a safetensors file:
the groups as tensors `group.N`, and in its metadata the format and version, the artifact it
belongs to (library and weight hashes, ABI), the cache's JSON description, the token history
and any extra JSON (chat messages). Loading checks all of it before touching the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmc.artifacts.abi import ABI_VERSION
from fmc.artifacts.manifest import Manifest
from fmc.errors import ArtifactError, InputError

if TYPE_CHECKING:
    from fmc.runtime.engine import Engine

FORMAT = "fmc-session"
VERSION = 1
SUFFIX = ".fmcs"


def artifact_identity(manifest: Manifest) -> str:
    """What a saved KV state is only valid for: this library and these weights."""
    parts = [entry.sha256 for entry in manifest.files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def write_session(engine: Engine, seq: int, path: Path, extra: dict[str, Any]) -> None:
    """Written beside `path` and renamed into place: never a half-written session."""
    import os

    from safetensors.numpy import save_file

    metadata, groups, tokens = engine.export_sequence(seq)
    header = {"format": FORMAT, "version": str(VERSION), "abi_version": str(ABI_VERSION),
              "artifact": artifact_identity(engine.manifest), "kv_cache": metadata,
              "tokens": json.dumps(tokens), "extra": json.dumps(extra)}
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({f"group.{i}": g for i, g in enumerate(groups)}, str(temp), metadata=header)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _page_groups(description: object) -> int:
    """How many page groups a KV-cache description (TVM's export JSON) lists, after checking
    the fields fmc reads from it."""
    groups = description["groups"] if isinstance(description, dict) else None
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("shape"), list)
            and all(type(d) is int for d in g["shape"]) and isinstance(g.get("dtype"), str)
            and type(g.get("group_index")) is int for g in groups):
        raise ValueError("kv_cache must describe its page groups (shape, dtype, group_index)")
    return len(groups)


def read_session(engine: Engine, path: Path) -> tuple[str, list[np.ndarray], list[int], dict]:
    from fmc.artifacts.safetensors_reader import SafetensorsFile

    if not path.is_file():
        raise InputError(f"{path}: no such session file")
    try:
        file = SafetensorsFile(path)
    except InputError as exc:
        raise ArtifactError(str(exc)) from None
    try:
        header = file.metadata
        if header.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not an fmc session file")
        if header.get("version") != str(VERSION) or header.get("abi_version") != str(ABI_VERSION):
            raise ArtifactError(f"{path}: session format {header.get('version')} / ABI "
                                f"{header.get('abi_version')}; this fmc reads {VERSION} / "
                                f"{ABI_VERSION}")
        if header.get("artifact") != artifact_identity(engine.manifest):
            raise ArtifactError(f"{path}: saved from another artifact (library or weights "
                                f"differ from {engine.path}); its KV state cannot be used here")
        try:
            tokens = json.loads(header["tokens"])
            extra = json.loads(header.get("extra", "{}"))
            metadata = header["kv_cache"]
            count = _page_groups(json.loads(metadata))
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: corrupt session metadata ({exc})") from None
        vocab = engine.manifest.model.vocab_size
        if not isinstance(tokens, list) or not all(
                type(t) is int and 0 <= t < vocab for t in tokens):
            raise ArtifactError(f"{path}: corrupt session metadata (tokens must be a list of "
                                f"token ids below {vocab})")
        if not isinstance(extra, dict):
            raise ArtifactError(f"{path}: corrupt session metadata (extra must be a JSON "
                                "object)")
        try:
            groups = [file.load(f"group.{i}") for i in range(count)]
        except (KeyError, InputError) as exc:
            raise ArtifactError(f"{path}: missing or corrupt KV pages ({exc})") from None
    finally:
        file.close()
    return metadata, groups, tokens, extra
