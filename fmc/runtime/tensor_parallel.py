"""A tensor-parallel artifact's ranks run in one process: fmc's CPU proof of the sharded
program, and how `fmc run` executes such an artifact on a machine without several GPUs.

Each rank has its own VM, its own weights (`params/rank-R/`) and its own KV cache; a step
calls every rank's entry function in a thread of its own, and the library's collective
calls (`runtime.disco.allreduce`, what Disco provides on GPUs: NCCL under a Disco session)
land in `InProcessAllReduce`, which sums the ranks' tensors at a barrier. The compiled code
is the same as under Disco; only the provider of the collective differs (docs/targets.md)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from fmc.errors import ArtifactError

ALLREDUCE = "runtime.disco.allreduce"
REDUCE_SUM = 0  # Disco's ReduceKind::kSum, the shape argument's only entry
# Entry functions whose results are each rank's own (the others return rank 0's outputs:
# after the last all-reduce every rank computes the same logits).
PER_RANK_RESULTS = {"create_kv_cache"}


class PerRank(list):
    """One value per rank, passed to each rank's call in its place."""


class InProcessAllReduce:
    """Sum over the ranks of one group; each rank thread calls it with its own tensors."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.barrier = threading.Barrier(ranks)
        self.inputs: list[np.ndarray | None] = [None] * ranks
        self.total: np.ndarray | None = None
        self.calls = 0  # all-reduces completed (rank 0 counts), for tests and `inspect`

    def __call__(self, rank: int, source, kind, destination) -> None:
        if int(kind[0]) != REDUCE_SUM:
            raise ArtifactError(f"in-process collective: reduce kind {int(kind[0])} is not "
                                "supported (fmc's libraries only sum)")
        self.inputs[rank] = source.numpy()
        self.barrier.wait()
        if rank == 0:
            stacked = np.stack(self.inputs)
            # NCCL sums in the tensor's dtype; float16 partial sums are accumulated in float32
            # here and rounded once, which is at least as accurate.
            self.total = stacked.sum(axis=0, dtype=np.float32 if stacked.dtype == np.float16
                                     else stacked.dtype).astype(stacked.dtype)
            self.calls += 1
        self.barrier.wait()
        destination.copyfrom(self.total)
        self.barrier.wait()  # nobody overwrites `inputs` before every rank has its copy


_current = threading.local()  # .group, .rank of the rank thread running a VM call


def _dispatch_allreduce(source, kind, in_group, destination) -> None:
    group = getattr(_current, "group", None)
    if group is None:
        raise ArtifactError(f"{ALLREDUCE} called outside a rank thread: tensor-parallel "
                            "libraries run under fmc's rank group or TVM's Disco")
    group.collective(_current.rank, source, kind, destination)


_registered = False


def register_collective() -> None:
    """Provide `runtime.disco.allreduce` in this process (once): the CPU wheel has no Disco
    CCL, and a process that runs Disco workers does not use this module."""
    global _registered
    if not _registered:
        import tvm_ffi

        tvm_ffi.register_global_func(ALLREDUCE, _dispatch_allreduce, override=True)
        _registered = True


class RankGroup:
    """N ranks' VMs with the interface of one: `group["prefill"](*args)` runs every rank's
    `prefill`, each with its own value of every `PerRank` argument. The VMs must be loaded
    after `register_collective()`."""

    def __init__(self, vms: list[Any]):
        self.vms = vms
        self.ranks = len(vms)
        self.collective = InProcessAllReduce(self.ranks)
        self._pool = ThreadPoolExecutor(self.ranks, thread_name_prefix="fmc-rank")

    def __getitem__(self, function: str):
        return lambda *args: self.run(function, args)

    def set_instrument(self, callback) -> None:
        self.vms[0].set_instrument(callback)  # rank 0's calls stand for the step

    def run(self, function: str, args: tuple) -> Any:
        def on_rank(rank: int):
            _current.group, _current.rank = self, rank
            try:
                own = [a[rank] if isinstance(a, PerRank) else a for a in args]
                return self.vms[rank][function](*own)
            except BaseException:
                self.collective.barrier.abort()  # the others stop waiting for this rank
                raise
            finally:
                _current.group = None

        futures = [self._pool.submit(on_rank, rank) for rank in range(self.ranks)]
        try:
            wait(futures)
        except KeyboardInterrupt:
            wait(futures)  # the step finishes on every rank before the caller rolls it back
            raise
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            self.collective.barrier.reset()
            # the failing rank's error, not the others' broken barrier
            raise next((e for e in errors if "BrokenBarrier" not in repr(e)), errors[0])
        results = [f.result() for f in futures]
        return PerRank(results) if function in PER_RANK_RESULTS else results[0]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def broadcast(function):
    """A KV-cache builtin applied to every rank's cache when given `PerRank` arguments;
    returns rank 0's result (sequence lengths and page counts are the same on every rank)."""

    def call(*args):
        ranks = next((len(a) for a in args if isinstance(a, PerRank)), None)
        if ranks is None:
            return function(*args)
        results = [function(*(a[r] if isinstance(a, PerRank) else a for a in args))
                   for r in range(ranks)]
        return results[0]

    return call
