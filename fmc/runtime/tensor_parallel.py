"""Run a tensor-parallel artifact on TVM's Disco runtime: one worker per rank, each with
its own VM, its own weights (`params/rank-R/`) and its own KV cache, driven in lockstep by
one controller — what MLC-LLM does for multi-GPU models.

On GPUs the workers' collectives are NCCL (`Session.init_ccl("nccl", …)`). The pinned CPU
wheel ships Disco but no collective library for the CPU, so fmc provides one for threaded
sessions: `runtime.disco..allreduce` and `runtime.disco..broadcast_from_worker0`, found by
Disco under the name of a worker that never ran `init_ccl` (its CCL name is empty). That is
the CPU proof of the sharded program: the library, the session, the weight loading and
every KV-cache call are Disco's; only the provider of the sums differs (docs/targets.md)."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from fmc.artifacts.manifest import Manifest
from fmc.errors import ArtifactError, UsageError

REDUCE_SUM = 0  # Disco's ReduceKind::kSum
BARRIER_TIMEOUT_S = 300.0
LOAD_RANK_PARAMS = "fmc.runtime.load_rank_params"
# Builtins whose result the controller reads (the others return objects that stay remote).
VALUE_BUILTINS = {"vm.builtin.attention_kv_cache_get_sequence_length",
                  "vm.builtin.attention_kv_cache_get_num_available_pages",
                  "vm.builtin.attention_kv_cache_get_checkpoint_metadata"}


def _worker_id() -> int:
    import tvm

    return int(tvm.get_global_func("runtime.disco.worker_id")()[0])


def _load_rank_params(artifact: str, manifest_json: str) -> list:
    """Runs in a worker: its rank's weights onto its device (registered in each worker)."""
    import tvm

    from fmc.runtime.artifact import load_params

    device = tvm.get_global_func("runtime.disco.device")()
    return load_params(Path(artifact), Manifest.from_json(manifest_json), device,
                       _worker_id())


def _register_loader() -> None:
    import tvm_ffi

    tvm_ffi.register_global_func(LOAD_RANK_PARAMS, _load_rank_params, override=True)


# Importing this module makes the loader callable by name in this process, and in the
# workers of a ProcessSession after `session.import_python_module(__name__)`.
_register_loader()


class CpuCollectives:
    """Sum and broadcast over the worker threads of one threaded Disco session."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        # A rank that never arrives (its worker failed) ends the wait with an error instead
        # of hanging the process; no step spends minutes between two collectives.
        self.barrier = threading.Barrier(ranks, timeout=BARRIER_TIMEOUT_S)
        self.inputs: list[np.ndarray | None] = [None] * ranks
        self.result: np.ndarray | None = None
        self.allreduce_calls = 0  # completed all-reduces (tests count them per step)

    def _exchange(self, destination) -> None:
        self.barrier.wait()
        destination.copyfrom(self.result)
        self.barrier.wait()  # nobody starts the next collective before every copy is done

    def allreduce(self, source, kind, in_group, destination) -> None:
        if int(kind) != REDUCE_SUM:
            raise ArtifactError(f"fmc's CPU collectives: reduce kind {int(kind)} is not "
                                "supported (fmc's libraries only sum)")
        rank = _worker_id()
        self.inputs[rank] = source.numpy()
        self.barrier.wait()
        if rank == 0:
            stacked = np.stack(self.inputs)
            # float16 partial sums are accumulated in float32 and rounded once
            wide = np.float32 if stacked.dtype == np.float16 else stacked.dtype
            self.result = stacked.sum(axis=0, dtype=wide).astype(stacked.dtype)
            self.allreduce_calls += 1
        self._exchange(destination)

    def broadcast_from_worker0(self, source, in_group, destination) -> None:
        if _worker_id() == 0:
            self.result = source.numpy()
        self._exchange(destination)


# The collectives of each worker thread (threaded sessions of several engines may coexist).
_by_thread: dict[int, CpuCollectives] = {}
_joining: dict[int, CpuCollectives] = {}
JOIN_COLLECTIVES = "fmc.runtime.join_cpu_collectives"


def _join(token: int) -> None:
    """Runs in each worker once: binds the worker's thread to its session's collectives."""
    _by_thread[threading.get_ident()] = _joining[int(token)]


def _register_cpu_collectives() -> None:
    import tvm_ffi

    def allreduce(*args):
        _by_thread[threading.get_ident()].allreduce(*args)

    def broadcast(*args):
        _by_thread[threading.get_ident()].broadcast_from_worker0(*args)

    tvm_ffi.register_global_func("runtime.disco..allreduce", allreduce, override=True)
    tvm_ffi.register_global_func("runtime.disco..broadcast_from_worker0", broadcast,
                                 override=True)
    tvm_ffi.register_global_func(JOIN_COLLECTIVES, _join, override=True)


def attach_cpu_collectives(session, ranks: int) -> CpuCollectives:
    """Give a threaded Disco session on the CPU fmc's collectives (before it loads a VM)."""
    _register_cpu_collectives()
    collectives = CpuCollectives(ranks)
    _joining[id(collectives)] = collectives
    session.call_packed(session.get_global_func(JOIN_COLLECTIVES), id(collectives))
    return collectives


def _forget(collectives: CpuCollectives) -> None:
    """Unbind a closed or collected session's worker threads from its collectives."""
    _joining.pop(id(collectives), None)
    for thread in [t for t, c in _by_thread.items() if c is collectives]:
        del _by_thread[thread]


def collectives_available() -> dict[str, bool]:
    """Which collective libraries the loaded TVM gives Disco, asked of TVM itself (`fmc
    doctor` reads the same from the libraries' files, without loading them)."""
    import tvm

    from fmc.devices.collectives import CCLS, registered_name

    return {ccl: tvm.get_global_func(registered_name(ccl), allow_missing=True) is not None
            for ccl in CCLS} | {"fmc-cpu": True}


def disco_session_module():
    """tvm.runtime.disco.session with its FFI functions bound: the wheel imports the module
    before the library holding Disco is loaded, which leaves them unbound."""
    import importlib

    import tvm  # noqa: F401  (loads the runtime libraries)
    import tvm_ffi

    session = importlib.import_module("tvm.runtime.disco.session")
    tvm_ffi.init_ffi_api("runtime.disco", "tvm.runtime.disco._ffi_api")
    return session


class _Remote:
    """A builtin's result on the workers, read from worker 0 when the engine needs it."""

    def __init__(self, dref):
        self.dref = dref

    def __int__(self) -> int:
        return int(self.dref.debug_get_from_remote(0))

    def __str__(self) -> str:
        return str(self.dref.debug_get_from_remote(0))


class DiscoRanks:
    """A Disco session over N ranks as an `Executor` (fmc.runtime.executor):
    `ranks["prefill"](*args)` calls `prefill` on every worker, host tensors are broadcast,
    remote values (parameters, KV caches, intermediate tensors) stay on the workers."""

    def __init__(self, artifact: Path, manifest: Manifest, device):
        import tvm

        self.ranks = manifest.ranks
        on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        ccl = None if on_cpu else \
            "nccl" if device.dlpack_device_type() == tvm.cuda().dlpack_device_type() else "rccl"
        if ccl and tvm.get_global_func(f"runtime.disco.{ccl}.init_ccl", allow_missing=True) \
                is None:
            raise ArtifactError(f"{artifact}: this TVM build has no {ccl.upper()} collectives "
                                f"(the PyPI wheel ships none); running {self.ranks} ranks on "
                                f"GPUs needs TVM built with USE_{ccl.upper()}=ON")
        session = disco_session_module()
        self.session = session.ThreadedSession(num_workers=self.ranks)
        self.collectives = None
        if on_cpu:
            self.collectives = attach_cpu_collectives(self.session, self.ranks)
            placement = device
        else:  # GPUs: worker r on device r, NCCL (CUDA) or RCCL (ROCm) between them
            self.session.init_ccl(ccl, *range(self.ranks))
            placement = None  # each worker's own device, set by init_ccl
        library = artifact / manifest.library.file
        self._placement = placement
        self.module = self.session.load_vm_module(str(library), placement)
        self.params = self.session.call_packed(self.session.get_global_func(LOAD_RANK_PARAMS),
                                               str(artifact), manifest.to_json())
        self._globals: dict[str, Any] = {}
        self._tuple_getitem = self.session.get_global_func("vm.builtin.tuple_getitem")
        # Closed when collected or at exit, whichever comes first: a worker still busy when
        # the process ends aborts it.
        self._finalizer = weakref.finalize(self, _shut_down, self.session, self.collectives)

    def _arg(self, value):
        import tvm

        if isinstance(value, _Remote):
            return value.dref
        if isinstance(value, tvm.runtime.Tensor):
            return self.session.broadcast(value)
        return value

    def __getitem__(self, function: str):
        entry = self.module[function]
        return lambda *args: entry(*(self._arg(a) for a in args))

    def builtin(self, name: str):
        """A VM builtin run on every worker (KV-cache operations, reshape)."""
        if name not in self._globals:
            self._globals[name] = self.session.get_global_func(name)
        function = self._globals[name]

        def call(*args):
            result = self.session.call_packed(function, *(self._arg(a) for a in args))
            return _Remote(result) if name in VALUE_BUILTINS else result

        return call

    def empty(self, shape: list[int], dtype: str):
        """A tensor of `shape` on every worker (each rank's KV pages, for example)."""
        return self.session.empty(shape, dtype, self._placement)

    def host_shape(self, shape: list[int]) -> list[int]:
        """What `to_host` makes of a per-worker tensor of `shape`."""
        return [self.ranks, *shape]

    def to_host(self, tensor) -> np.ndarray:
        """Every rank's copy of a per-worker tensor, stacked along a new leading axis."""
        return np.stack([tensor.debug_get_from_remote(rank).numpy()
                         for rank in range(self.ranks)])

    def from_host(self, stacked: np.ndarray):
        """The inverse of `to_host`: rank r's tensor is `stacked[r]`."""
        import tvm

        tensor = self.empty(list(stacked.shape[1:]), str(stacked.dtype))
        for rank in range(self.ranks):
            tensor.debug_copy_from(rank, tvm.runtime.tensor(np.ascontiguousarray(stacked[rank])))
        return tensor

    def first_output(self, outputs) -> np.ndarray:
        """Element 0 of an entry function's result tuple (the logits), from worker 0: after
        the last all-reduce every rank computes the same values."""
        item = self.session.call_packed(self._tuple_getitem, outputs, 0)
        return item.debug_get_from_remote(0).numpy()

    def set_instrument(self, callback) -> None:
        raise UsageError("profiling a tensor-parallel artifact is not supported: its calls "
                         "run in the Disco workers")

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()


def close_session(session) -> None:
    """Wait for every Disco worker to finish its queue, then stop them. Shutdown alone does not
    wait: a worker still running when the process exits aborts it ("terminate called without
    an active exception")."""
    import importlib

    sync = importlib.import_module("tvm.runtime.disco._ffi_api").SessionSyncWorker
    for worker in range(session.num_workers):
        sync(session, worker)
    session.shutdown()


def _shut_down(session, collectives: CpuCollectives | None) -> None:
    close_session(session)
    if collectives is not None:
        _forget(collectives)
