"""Open an artifact: check the manifest and hashes, load the library and the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmc.artifacts import abi
from fmc.artifacts.manifest import MANIFEST, Manifest, Param, read_manifest
from fmc.artifacts.safetensors_reader import SafetensorsFile
from fmc.artifacts.shards import sha256_file
from fmc.errors import ArtifactError, InputError
from fmc.runtime.devices import device_for, host_device
from fmc.runtime.executor import Executor
from fmc.runtime.memory import release_free_heap

# Artifacts up to this size have every shard hashed on load unless the caller says otherwise.
VERIFY_BY_DEFAULT_BYTES = 2 * 1024**3


def verify_files(artifact: Path, manifest: Manifest) -> None:
    """sha256 of the library and every shard against the manifest; names the first bad file."""
    for entry in manifest.files:
        path = artifact / entry.file
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the artifact")
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: sha256 mismatch with the manifest (corrupt or altered)")


def should_verify(manifest: Manifest, verify: bool | None) -> bool:
    if verify is not None:
        return verify
    return manifest.weights.total_bytes <= VERIFY_BY_DEFAULT_BYTES


class LocalVM:
    """The artifact's VM on one device, as an `Executor` (fmc.runtime.executor): entry
    functions by name, VM builtins, an entry's first output on the host, and device tensors
    to and from the host (KV page groups)."""

    ranks = 1

    def __init__(self, vm, device):
        import tvm

        self.vm, self.device, self._tvm = vm, device, tvm

    def __getitem__(self, function: str):
        return self.vm[function]

    def set_instrument(self, callback) -> None:
        self.vm.set_instrument(callback)

    def builtin(self, name: str):
        return self._tvm.get_global_func(name)

    def first_output(self, outputs) -> np.ndarray:
        return outputs[0].numpy()

    def empty(self, shape: list[int], dtype: str):
        return self._tvm.runtime.empty(shape, dtype, self.device)

    def host_shape(self, shape: list[int]) -> list[int]:
        return list(shape)

    def to_host(self, tensor) -> np.ndarray:
        return tensor.numpy()

    def from_host(self, array: np.ndarray):
        return self._tvm.runtime.tensor(np.ascontiguousarray(array), self.device)


@dataclass
class LoadedArtifact:
    path: Path
    manifest: Manifest
    vm: Executor  # LocalVM, or DiscoRanks for a tensor-parallel artifact
    device: Any
    params: list[Any]


def load_library(artifact: Path, manifest: Manifest, device):
    import tvm
    from tvm import relax

    library = artifact / manifest.library.file
    if not library.is_file():
        raise ArtifactError(f"{library}: missing from the artifact")
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    except Exception as exc:  # TVM raises its own error types for unloadable libraries
        raise ArtifactError(f"{library}: cannot be loaded on this machine ({exc})") from None
    embedded = abi.LibraryMetadata.from_json(str(vm[abi.METADATA_FUNCTION]()))
    if embedded.abi_version != abi.ABI_VERSION:
        raise ArtifactError(f"{library}: library ABI {embedded.abi_version} does not match "
                            f"this fmc ({abi.ABI_VERSION})")
    if embedded.params != [p.signature for p in manifest.params]:
        raise ArtifactError(f"{library}: parameters differ from {artifact / MANIFEST}")
    return vm


def load_params(artifact: Path, manifest: Manifest, device, rank: int = 0) -> list[Any]:
    """Rank `rank`'s parameters (a tensor-parallel artifact holds one set per rank)."""
    import tvm

    if not manifest.weights.present:
        raise ArtifactError(f"{artifact}: compiled without weights (a weights-free artifact); "
                            "recompile with weights to run it")
    opened: dict[str, SafetensorsFile] = {}
    params = []
    try:
        for entry in manifest.params:
            shard = entry.location(rank).shard
            if shard not in opened:
                try:
                    opened[shard] = SafetensorsFile(artifact / shard)
                except InputError as exc:
                    raise ArtifactError(str(exc)) from None
            try:
                array = opened[shard].load(entry.name)
            except KeyError:
                raise ArtifactError(f"{artifact / shard}: tensor {entry.name!r} "
                                    "missing") from None
            _check_tensor(artifact / shard, entry, array.shape, array.dtype)
            params.append(tvm.runtime.tensor(np.ascontiguousarray(array), device))
    finally:
        for shard in opened.values():
            shard.close()
    return params


def _check_tensor(shard: Path, entry: Param, shape, dtype) -> None:
    if tuple(shape) != entry.shape or str(dtype) != entry.dtype:
        raise ArtifactError(f"{shard}: tensor {entry.name!r} is {dtype}{list(shape)}, "
                            f"manifest says {entry.dtype}{list(entry.shape)}")


def check_tensor_index(artifact: Path, manifest: Manifest) -> str:
    """Every listed tensor is in its shard (every rank's, for a tensor-parallel artifact)
    with the listed shape and dtype; reads the shards' headers only."""
    if not manifest.weights.present:
        return "weights-free artifact: no tensors"
    indexes: dict[str, dict] = {}
    for entry in manifest.params:
        for name in [r.shard for r in entry.ranks or ()] or [entry.stored.shard]:
            if name not in indexes:
                try:
                    opened = SafetensorsFile(artifact / name)
                except InputError as exc:
                    raise ArtifactError(str(exc)) from None
                indexes[name] = opened.index()
                opened.close()
            info = indexes[name].get(entry.name)
            if info is None:
                raise ArtifactError(f"{artifact / name}: tensor {entry.name!r} missing")
            _check_tensor(artifact / name, entry, info.shape, info.dtype)
    ranks = manifest.ranks
    return f"{len(manifest.params)} tensor(s) with the listed shapes and dtypes" + \
        (f" on each of {ranks} ranks" if ranks > 1 else "")


def open_artifact(path: Path | str, device=None, verify: bool | None = None) -> LoadedArtifact:
    artifact = Path(path)
    manifest = read_manifest(artifact)
    if should_verify(manifest, verify):
        verify_files(artifact, manifest)
    device = device or device_for(manifest.target)
    if manifest.ranks == 1:
        vm = LocalVM(load_library(artifact, manifest, device), device)
        params = load_params(artifact, manifest, device)
    else:
        from fmc.runtime.tensor_parallel import DiscoRanks

        # Checked here: a failure inside a Disco worker ends the whole process.
        load_library(artifact, manifest, device)  # ABI and parameter list
        if not manifest.weights.present:
            load_params(artifact, manifest, device)  # its error, before any worker starts
        check_tensor_index(artifact, manifest)
        vm = DiscoRanks(artifact, manifest, device)  # loads each rank's weights in its worker
        params = vm.params
    release_free_heap()
    return LoadedArtifact(artifact, manifest, vm, device, params)


def verify_artifact(path: Path | str) -> list[dict[str, Any]]:
    """Every check `fmc verify` runs, in order, as {"check", "ok", "detail"}; ok is None for a
    check that cannot run here (a library for another machine). Stops after the first
    failure: later checks would only repeat it."""
    artifact = Path(path)
    checks: list[dict[str, Any]] = []

    def record(check: str, action) -> bool:
        try:
            detail = action()
        except ArtifactError as exc:
            checks.append({"check": check, "ok": False, "detail": str(exc)})
            return False
        checks.append({"check": check, "ok": detail is not None or None,
                       "detail": detail or "skipped"})
        return True

    read: list[Manifest] = []  # filled by the first check, read by the later ones

    def check_manifest():
        read.append(read_manifest(artifact))
        return f"format {read[0].format}, ABI {read[0].abi_version}"

    def check_files():
        verify_files(artifact, read[0])
        return f"{len(read[0].files)} file(s) match their sha256"

    def check_tensors():
        return check_tensor_index(artifact, read[0])

    def check_library():
        device = host_device(read[0].target)
        if device is None:
            return None  # built for another machine or device: not loadable here
        load_library(artifact, read[0], device)
        return "loads; embedded ABI and parameter list match the manifest"

    for name, action in (("manifest", check_manifest), ("file hashes", check_files),
                         ("tensors", check_tensors), ("library", check_library)):
        if not record(name, action):
            break
    return checks
