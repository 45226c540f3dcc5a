"""A sequence's KV state outside the cache: host arrays (offload) and session files (save,
restore, `fmc chat --session`).

TVM's paged KV cache exports a sequence as page groups (one per layer: [1, pages, 2,
kv_heads, page_size, head_dim] holding the rotated keys and the values) plus a JSON
description, and imports them into a new sequence (a tensor-parallel engine: every rank's
groups, stacked along a leading axis). A session file is a safetensors file:
the groups as tensors `group.N`, and in its metadata the format and version, the artifact it
belongs to (library and weight hashes, ABI), the cache's JSON description, the token history
and any extra JSON (chat messages). Loading checks all of it before touching the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmc.artifacts.manifest import ABI_VERSION
from fmc.errors import ArtifactError, InputError

if TYPE_CHECKING:
    from fmc.runtime.engine import Engine

# TVM 0.27 checkpoints only sequence id 0; the engine never hands it out and moves a
# sequence through it with a fork (which shares pages instead of copying them).
CHECKPOINT_SEQ = 0

FORMAT = "fmc-session"
VERSION = 1
SUFFIX = ".fmcs"


def artifact_identity(manifest: dict[str, Any]) -> str:
    """What a saved KV state is only valid for: this library and these weights."""
    parts = [manifest["library"]["sha256"], *(s["sha256"] for s in manifest["weights"]["shards"])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def export_pages(engine: Engine, seq: int) -> tuple[str, list[np.ndarray], list[int]]:
    b = engine._kv_builtins
    buffers = engine._vm  # device tensors to and from the host, one per rank if sharded
    b.fork_sequence(engine.kv_cache, seq, CHECKPOINT_SEQ, -1)
    try:
        metadata = str(b.checkpoint_metadata(engine.kv_cache, CHECKPOINT_SEQ))
        groups = []
        for group in json.loads(metadata)["groups"]:
            out = buffers.empty(group["shape"], group["dtype"])
            b.export_page_group(engine.kv_cache, CHECKPOINT_SEQ, group["group_index"], out)
            groups.append(buffers.to_host(out))
    finally:
        b.remove_sequence(engine.kv_cache, CHECKPOINT_SEQ)
    return metadata, groups, list(engine.history[seq])


def import_pages(engine: Engine, seq: int, metadata: str, groups: list[np.ndarray]) -> None:
    b = engine._kv_builtins
    buffers = engine._vm
    described = json.loads(metadata)["groups"]
    if len(described) != len(groups) or any(
            list(g.shape) != buffers.host_shape(d["shape"]) or str(g.dtype) != d["dtype"]
            for g, d in zip(groups, described, strict=False)):
        raise ArtifactError("the saved KV pages do not match their description")
    b.prepare_import(engine.kv_cache, CHECKPOINT_SEQ, metadata)
    try:
        for group, array in zip(described, groups, strict=True):
            b.import_page_group(engine.kv_cache, CHECKPOINT_SEQ, group["group_index"],
                                buffers.from_host(array))
        b.finish_import(engine.kv_cache, CHECKPOINT_SEQ)
        b.fork_sequence(engine.kv_cache, CHECKPOINT_SEQ, seq, -1)
    finally:
        b.remove_sequence(engine.kv_cache, CHECKPOINT_SEQ)


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


def read_session(engine: Engine, path: Path) -> tuple[str, list[np.ndarray], list[int], dict]:
    from fmc.frontend.safetensors_reader import SafetensorsFile

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
            count = len(json.loads(metadata)["groups"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: corrupt session metadata ({exc})") from None
        try:
            groups = [file.load(f"group.{i}") for i in range(count)]
        except (KeyError, InputError) as exc:
            raise ArtifactError(f"{path}: missing or corrupt KV pages ({exc})") from None
    finally:
        file.close()
    return metadata, groups, tokens, extra
