"""The artifact's paged KV cache: TVM's cache object, the sequences in it and what each one
holds, behind the only code that calls the VM's `kv_state_*` / `attention_kv_cache_*`
builtins.

A tensor-parallel artifact has one cache per rank; the executor (`LocalVM` or
`DiscoRanks`) runs every builtin on all of them, so nothing here knows about ranks except
that page groups on the host gain a leading rank axis (`executor.to_host`)."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator

import numpy as np

from fmc.artifacts import abi
from fmc.errors import ArtifactError
from fmc.runtime.executor import Executor

# TVM 0.27 checkpoints only sequence id 0; the cache never hands it out and moves a
# sequence through it with a fork (which shares pages instead of copying them).
CHECKPOINT_SEQ = 0


class PagedCache:
    """Sequences (ids from 1) with their token history, fork/pop, forward steps, and page
    export/import for save, restore and offload."""

    def __init__(self, executor: Executor, max_batch_size: int, context_window: int,
                 prefill_chunk: int, page_size: int):
        from tvm.runtime import ShapeTuple

        get = executor.builtin
        self._executor = executor
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._popn = get("vm.builtin.kv_state_popn")
        self._begin_forward = get("vm.builtin.kv_state_begin_forward")
        self._end_forward = get("vm.builtin.kv_state_end_forward")
        self._length = get("vm.builtin.attention_kv_cache_get_sequence_length")
        self._available_pages = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._checkpoint_metadata = get(
            "vm.builtin.attention_kv_cache_get_checkpoint_metadata")
        self._export_page_group = get("vm.builtin.attention_kv_cache_export_page_group")
        self._prepare_import = get("vm.builtin.attention_kv_cache_prepare_import")
        self._import_page_group = get("vm.builtin.attention_kv_cache_import_page_group")
        self._finish_import = get("vm.builtin.attention_kv_cache_finish_import")
        self._shape = ShapeTuple
        # The VM's cache object, the argument every entry function takes.
        self.handle = executor[abi.CREATE_KV_CACHE](
            ShapeTuple([max_batch_size]), ShapeTuple([context_window]),
            ShapeTuple([prefill_chunk]), ShapeTuple([page_size]))
        self._ids = itertools.count(CHECKPOINT_SEQ + 1)
        # Token ids in each live sequence's cache (save files, repetition penalty, chat).
        self.history: dict[int, list[int]] = {}

    # -- sequences ---------------------------------------------------------------------------
    def new_id(self) -> int:
        return next(self._ids)

    def add(self, seq: int) -> None:
        self._add(self.handle, seq)
        self.history[seq] = []

    def remove(self, seq: int) -> None:
        self._remove(self.handle, seq)
        del self.history[seq]

    def fork(self, seq: int, child: int, at: int | None = None) -> None:
        """`child` holds `seq`'s first `at` tokens (all by default); full pages are shared."""
        self._fork(self.handle, seq, child, -1 if at is None else at)
        self.history[child] = list(self.history[seq][:at])

    def pop(self, seq: int, count: int) -> None:
        if count:
            self._popn(self.handle, seq, count)
            del self.history[seq][-count:]

    def length(self, seq: int) -> int:
        """Tokens of `seq` in the cache."""
        return int(self._length(self.handle, seq))

    def available_pages(self) -> int:
        return int(self._available_pages(self.handle))

    @contextlib.contextmanager
    def forward(self, seqs: list[int], tokens: list[list[int]]) -> Iterator[None]:
        """One forward step appending `tokens[i]` to `seqs[i]`; the history grows only when
        the step completes. An interrupted step (Ctrl-C in chat) is undone, so the cache
        keeps matching the history."""
        lengths = [len(t) for t in tokens]
        self._begin_forward(self.handle, self._shape(seqs), self._shape(lengths))
        try:
            yield
        except BaseException:
            # begin_forward already lengthened the sequences.
            self._end_forward(self.handle)
            for seq, length in zip(seqs, lengths, strict=True):
                if seq in self.history and self.length(seq) > len(self.history[seq]):
                    self._popn(self.handle, seq, length)
            raise
        self._end_forward(self.handle)
        for seq, added in zip(seqs, tokens, strict=True):
            self.history[seq].extend(int(t) for t in added)

    # -- pages -------------------------------------------------------------------------------
    def export(self, seq: int) -> tuple[str, list[np.ndarray], list[int]]:
        """(TVM's JSON description of the pages, the page groups on the host, the tokens)."""
        self._fork(self.handle, seq, CHECKPOINT_SEQ, -1)
        try:
            metadata = str(self._checkpoint_metadata(self.handle, CHECKPOINT_SEQ))
            groups = []
            for group in json.loads(metadata)["groups"]:
                out = self._executor.empty(group["shape"], group["dtype"])
                self._export_page_group(self.handle, CHECKPOINT_SEQ, group["group_index"], out)
                groups.append(self._executor.to_host(out))
        finally:
            self._remove(self.handle, CHECKPOINT_SEQ)
        return metadata, groups, list(self.history[seq])

    def import_pages(self, seq: int, metadata: str, groups: list[np.ndarray],
                     tokens: list[int]) -> None:
        """Recreate `seq` from `export`'s output by copying its pages in. TVM 0.27 imports
        only into an empty cache: the caller recomputes instead while others are live."""
        executor = self._executor
        described = json.loads(metadata)["groups"]
        if len(described) != len(groups) or any(
                list(g.shape) != executor.host_shape(d["shape"]) or str(g.dtype) != d["dtype"]
                for g, d in zip(groups, described, strict=False)):
            raise ArtifactError("the saved KV pages do not match their description")
        self._prepare_import(self.handle, CHECKPOINT_SEQ, metadata)
        try:
            for group, array in zip(described, groups, strict=True):
                self._import_page_group(self.handle, CHECKPOINT_SEQ, group["group_index"],
                                        executor.from_host(array))
            self._finish_import(self.handle, CHECKPOINT_SEQ)
            self._fork(self.handle, CHECKPOINT_SEQ, seq, -1)
        finally:
            self._remove(self.handle, CHECKPOINT_SEQ)
        self.history[seq] = list(tokens)
