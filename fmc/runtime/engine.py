"""The Engine: an artifact's entry functions driven over TVM's paged KV cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fmc.artifacts import abi
from fmc.errors import ArtifactError, UsageError
from fmc.runtime.artifact import open_artifact
from fmc.runtime.generation import Generation, Step, StopRule
from fmc.runtime.kv_cache import PagedCache
from fmc.runtime.sampling import SamplingParams
from fmc.runtime.threads import configure_threads
from fmc.runtime.tokenizer import TextTokenizer


class _Stream:
    """What `Engine.stream` returns: iterable both ways."""

    def __init__(self, engine: Engine, *args):
        self.engine, self.args = engine, args

    def __iter__(self) -> Iterator[str]:
        return self.engine._stream_sync(*self.args)

    def __aiter__(self):
        return self.engine.stream_async(*self.args).__aiter__()


class Engine:
    """Load with `fmc.load(path)`; `generate` for text, `logits` for numerics."""

    def __init__(self, path: Path | str, device=None, verify: bool | None = None,
                 context_window: int | None = None, max_batch_size: int = 8,
                 threads: int | None = None):
        import tvm
        from tvm.runtime import ShapeTuple

        self.threads = configure_threads(threads)
        self.artifact = open_artifact(path, device, verify)
        self.path = self.artifact.path
        self.manifest = self.artifact.manifest
        self.config = self.manifest.model
        runtime = self.manifest.runtime
        self.context_window = context_window or runtime.context_window
        if self.context_window > self.config.context_window:
            raise UsageError(f"context window {self.context_window} exceeds the model's "
                             f"{self.config.context_window}")
        self.prefill_chunk = runtime.prefill_chunk_size
        self.max_batch_size = max_batch_size
        self._vm = self.artifact.vm  # LocalVM, or DiscoRanks for a tensor-parallel artifact
        self.ranks = self._vm.ranks
        self._params = self.artifact.params
        self._device = self.artifact.device
        self._tvm = tvm
        self._shape = ShapeTuple
        self._reshape = self._vm.builtin("vm.builtin.reshape")
        self.cache = PagedCache(self._vm, max_batch_size, self.context_window,
                                self.prefill_chunk, runtime.page_size)
        self._offloaded: dict[int, Any] = {}
        self.last_import = ""  # how the last restore/bring_back rebuilt its pages
        self._scheduler = None
        self._tokenizer: TextTokenizer | None = None

    @property
    def history(self) -> dict[int, list[int]]:
        """Token ids in each live sequence's cache (save files, repetition penalty, chat)."""
        return self.cache.history

    # -- tokenizer ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.path)
        return self._tokenizer

    @contextlib.contextmanager
    def instrumented(self, callback):
        """Run the VM with `callback(func, symbol, before_run, ret, *args)` around every call
        (fmc.runtime.profile); removed on exit."""
        self._vm.set_instrument(callback)
        try:
            yield self
        finally:
            self._vm.set_instrument(None)

    # -- low-level steps ---------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> np.ndarray:
        array = np.asarray(ids, dtype=np.int64)
        if array.ndim != 1 or array.size == 0:
            raise UsageError("token ids must be a non-empty 1-D sequence")
        if array.min() < 0 or array.max() >= self.config.vocab_size:
            raise UsageError(f"token id {int(array.max() if array.max() >= 0 else array.min())} "
                             f"is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return array.astype(np.int32)

    def _embed(self, ids: np.ndarray, shape: list[int]):
        tensor = self._tvm.runtime.tensor(ids, self._device)
        embedded = self._vm[abi.EMBED](tensor, self._params)
        return self._reshape(embedded, self._shape([*shape, self.config.hidden_size]))

    def _forward(self, function: str, seqs: list[int], tokens: list, *args) -> np.ndarray:
        """Run entry `function`, appending `tokens[i]` to `seqs[i]`; its first output."""
        with self.cache.forward(seqs, tokens):
            out = self._vm[function](*args, self.cache.handle, self._params)
        return self._vm.first_output(out)

    def new_sequence(self) -> int:
        seq = self.cache.new_id()
        self.cache.add(seq)
        return seq

    def _check_sequence(self, seq: int) -> None:
        if seq in self._offloaded:
            raise UsageError(f"sequence {seq} is offloaded; bring it back first")
        if seq not in self.history:
            raise UsageError(f"no sequence {seq}")

    def remove(self, seq: int) -> None:
        if self._offloaded.pop(seq, None) is not None:
            return
        self._check_sequence(seq)
        self.cache.remove(seq)

    def fork(self, seq: int, at: int | None = None) -> int:
        """A new sequence holding `seq`'s first `at` tokens (all by default); full pages of
        the shared prefix are shared, not copied."""
        self._check_sequence(seq)
        length = len(self.history[seq])
        if at is not None and not 0 < at <= length:
            raise UsageError(f"fork position {at} is outside sequence {seq} (1..{length})")
        child = self.cache.new_id()
        self.cache.fork(seq, child, at)
        return child

    def pop(self, seq: int, count: int) -> None:
        """Drop the last `count` tokens of `seq` from the cache."""
        self._check_sequence(seq)
        if not 0 <= count <= len(self.history[seq]):
            raise UsageError(f"cannot pop {count} of sequence {seq}'s "
                             f"{len(self.history[seq])} tokens")
        self.cache.pop(seq, count)

    def available_pages(self) -> int:
        """Free pages of the KV cache (a page holds `page_size` tokens of every layer)."""
        return self.cache.available_pages()

    # -- save, restore, offload --------------------------------------------------------------
    def export_sequence(self, seq: int):
        """(checkpoint metadata JSON, page groups as numpy arrays, token history) of `seq`."""
        self._check_sequence(seq)
        return self.cache.export(seq)

    def import_sequence(self, metadata: str, groups: list[np.ndarray],
                        tokens: list[int], seq: int | None = None) -> int:
        """Recreate a sequence from `export_sequence`'s output (as `seq`, or a new id) by
        copying its pages in. TVM 0.27 imports only into an empty cache, so with other live
        sequences the pages are recomputed from the token history instead (one prefill)."""
        seq = self.cache.new_id() if seq is None else seq
        if self.history:
            self.cache.add(seq)
            if tokens:
                self.prefill(seq, list(tokens))
            self.last_import = "recomputed"
        else:
            self.cache.import_pages(seq, metadata, groups, tokens)
            self.last_import = "copied"
        return seq

    def save(self, seq: int, path: Path | str, extra: dict | None = None) -> None:
        """Write `seq` (KV pages, tokens, `extra` JSON such as chat messages) to a session
        file that `restore` loads into an engine of the same artifact."""
        from fmc.runtime.session import write_session

        write_session(self, seq, Path(path), extra or {})

    def restore(self, path: Path | str) -> tuple[int, dict]:
        """Load a session file: (new sequence id, the extra JSON saved with it)."""
        from fmc.runtime.session import read_session

        metadata, groups, tokens, extra = read_session(self, Path(path))
        try:
            return self.import_sequence(metadata, groups, tokens), extra
        except (RuntimeError, ArtifactError) as exc:  # TVM's errors are RuntimeErrors
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise ArtifactError(f"{path}: the saved KV state does not load ({detail})") from None

    def offload(self, seq: int) -> None:
        """Move `seq`'s KV pages to host memory, freeing them in the cache; `bring_back`
        restores it under the same id."""
        exported = self.export_sequence(seq)
        self.remove(seq)
        self._offloaded[seq] = exported

    def bring_back(self, seq: int) -> None:
        if seq not in self._offloaded:
            raise UsageError(f"sequence {seq} is not offloaded")
        metadata, groups, tokens = self._offloaded.pop(seq)
        self.import_sequence(metadata, groups, tokens, seq)

    def sequence_length(self, seq: int) -> int:
        return self.cache.length(seq)

    def check_prompt(self, ids: list[int], what: str = "the prompt", room: int = 0) -> None:
        """A prompt must fit the context window, with `room` tokens to spare."""
        if len(ids) + room > self.context_window:
            raise UsageError(f"{what} is {len(ids)} tokens; the context window holds "
                             f"{self.context_window} (--context-window, up to the model's "
                             f"{self.config.context_window})")

    def _check_room(self, seq: int, extra: int) -> None:
        self._check_sequence(seq)
        total = self.sequence_length(seq) + extra
        if total > self.context_window:
            raise UsageError(f"sequence of {total} tokens exceeds the context window "
                             f"({self.context_window})")

    def prefill(self, seq: int, ids: list[int]) -> np.ndarray:
        """Append `ids` to sequence `seq`; returns the logits after its last token."""
        array = self._check_ids(ids)
        self._check_room(seq, len(array))
        logits = None
        for _, chunk, embedded in self._embedded_chunks(array):
            logits = self._forward(abi.PREFILL, [seq], [chunk], embedded)
        return logits[0, -1]

    def _embedded_chunks(self, array: np.ndarray):
        """(start, ids, embeddings [1, n, H]) per prefill chunk: longer prompts are split."""
        for start in range(0, len(array), self.prefill_chunk):
            chunk = array[start:start + self.prefill_chunk]
            yield start, chunk, self._embed(chunk, [1, len(chunk)])

    def decode(self, seq: int, token: int) -> np.ndarray:
        """Append one token to `seq`; returns the logits after it."""
        array = self._check_ids([token])
        self._check_room(seq, 1)
        embedded = self._embed(array, [1, 1])
        return self._forward(abi.DECODE, [seq], [array], embedded)[0, -1]

    def decode_batch(self, seqs: list[int], tokens: list[int]) -> np.ndarray:
        """One decode step for several sequences at once → logits [len(seqs), vocab]."""
        if len(seqs) != len(tokens) or not seqs:
            raise UsageError("decode_batch takes one token per sequence")
        if len(seqs) > self.max_batch_size:
            raise UsageError(f"{len(seqs)} sequences exceed the batch limit "
                             f"({self.max_batch_size})")
        if len(set(seqs)) != len(seqs):
            raise UsageError("a sequence appears twice in one decode step")
        array = self._check_ids(tokens)
        for seq in seqs:
            self._check_room(seq, 1)
        embedded = self._embed(array, [len(seqs), 1])
        return self._forward(abi.BATCH_DECODE, list(seqs), [[t] for t in array],
                             embedded)[:, -1]

    def prefill_batch(self, seqs: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Append each prompt to its sequence in packed forward passes (up to a prefill
        chunk of tokens each) → the logits after each prompt's last token [n, vocab]."""
        if len(seqs) != len(prompts) or not seqs or len(set(seqs)) != len(seqs):
            raise UsageError("prefill_batch takes one prompt per distinct sequence")
        arrays = [self._check_ids(p) for p in prompts]
        for seq, array in zip(seqs, arrays, strict=True):
            self._check_room(seq, len(array))
        out = np.zeros((len(seqs), self.config.vocab_size), np.float32)
        group: list[int] = []  # rows packed into the next forward pass
        for row, array in enumerate(arrays):
            if len(array) > self.prefill_chunk:  # longer than a chunk: on its own
                out[row] = self.prefill(seqs[row], list(array))
                continue
            packed = sum(len(arrays[i]) for i in group)
            if group and (len(group) == self.max_batch_size or
                          packed + len(array) > self.prefill_chunk):
                self._prefill_packed(seqs, arrays, out, group)
                group = []
            group.append(row)
        if group:
            self._prefill_packed(seqs, arrays, out, group)
        return out

    def _prefill_packed(self, all_seqs, all_arrays, out, rows) -> None:
        seqs, arrays = [all_seqs[i] for i in rows], [all_arrays[i] for i in rows]
        lengths = [len(a) for a in arrays]
        packed = np.concatenate(arrays)
        positions = np.cumsum(lengths) - 1
        index = self._tvm.runtime.tensor(positions.astype(np.int32), self._device)
        embedded = self._embed(packed, [1, len(packed)])
        logits = self._forward(abi.BATCH_PREFILL, list(seqs), arrays, embedded, index)[0]
        for row, result in zip(rows, logits, strict=True):
            out[row] = result

    def logits(self, token_ids: list[int], positions: list[int] | None = None) -> np.ndarray:
        """Logits after each of `token_ids` [n, vocab] in a fresh sequence, or only at
        `positions` (indices into token_ids; the output projection then runs only there)."""
        array = self._check_ids(token_ids)
        wanted = np.arange(len(array)) if positions is None else np.asarray(positions)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(array)):
            raise UsageError(f"logit positions must lie in 0..{len(array) - 1}")
        seq = self.new_sequence()
        try:
            self._check_room(seq, len(array))
            parts = []
            for start, chunk, embedded in self._embedded_chunks(array):
                local = wanted[(wanted >= start) & (wanted < start + len(chunk))] - start
                keep = local.size > 0
                if not keep:  # still run the chunk (later chunks attend to it), discard logits
                    local = np.array([len(chunk) - 1])
                index = self._tvm.runtime.tensor(local.astype(np.int32), self._device)
                out = self._forward(abi.BATCH_PREFILL, [seq], [chunk], embedded, index)[0]
                if keep:
                    parts.append(out)
        finally:
            self.remove(seq)
        vocab = self.config.vocab_size
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, vocab), np.float32)

    def layer_outputs(self, token_ids: list[int]) -> np.ndarray:
        """[layers + 2, n, hidden]: the embeddings, every decoder layer's output and the
        final norm's for `token_ids` in a fresh sequence (artifacts built --debug-layers)."""
        if abi.DEBUG_ENTRY not in self.manifest.entry_functions:
            raise UsageError(f"{self.path}: built without --debug-layers (no {abi.DEBUG_ENTRY} "
                             "entry); recompile with it to compare layers")
        array = self._check_ids(token_ids)
        if len(array) > self.prefill_chunk:
            raise UsageError(f"layer comparison takes at most {self.prefill_chunk} tokens "
                             "(the prefill chunk)")
        seq = self.new_sequence()
        try:
            self._check_room(seq, len(array))
            embedded = self._embed(array, [1, len(array)])
            return self._forward(abi.DEBUG_ENTRY, [seq], [array], embedded)
        finally:
            self.remove(seq)

    # -- generation --------------------------------------------------------------------------
    def stop_rule(self, max_tokens: int, stop_at_eos: bool = True,
                  stop: Iterable[str] = ()) -> StopRule:
        """This engine's stop rule: its context window and end-of-sequence ids."""
        return StopRule.of(max_tokens, self.context_window, self.config.eos_token_ids,
                           stop_at_eos, stop)

    def steps(self, prompt_ids: list[int], rule: StopRule,
              sampling: SamplingParams | None = None, text: bool = False) -> Iterator[Step]:
        """Generate alone: prefill, then one decode step per emitted token, every logits row
        through the generation policy (fmc.runtime.generation). With `text`, each step
        carries its text (needed for stop strings)."""
        self.check_prompt(prompt_ids)
        generation = Generation(rule, sampling, self.tokenizer if text else None)
        if generation.finished:
            return
        seq = self.new_sequence()
        try:
            yield from self.continue_steps(seq, self.prefill(seq, prompt_ids), generation)
        finally:
            self.remove(seq)

    def continue_steps(self, seq: int, logits, generation: Generation) -> Iterator[Step]:
        """The decode loop on an existing sequence whose last logits are `logits`: a step
        per logits row, decoding each emitted token until the policy finishes."""
        while True:
            step = generation.step(logits, self.history[seq], self.sequence_length(seq))
            yield step
            if step.finish_reason is not None:
                return
            logits = self.decode(seq, step.token)

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 128,
                     sampling: SamplingParams | None = None,
                     stop_at_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids one by one (the prompt is not repeated)."""
        rule = self.stop_rule(max_tokens, stop_at_eos)
        for step in self.steps(prompt_ids, rule, sampling):
            if step.token is not None:
                yield step.token

    def stream(self, prompt: str, max_tokens: int = 128,
               sampling: SamplingParams | None = None, stop_at_eos: bool = True,
               stop: Iterable[str] = ()) -> _Stream:
        """Text pieces as tokens are produced: `for piece in eng.stream(p)` generates
        alone; `async for piece in eng.stream(p)` joins the concurrent requests' batched
        decode steps (`stream_async`). Generation ends before any of the `stop` strings,
        which are not part of the text."""
        return _Stream(self, prompt, self.stop_rule(max_tokens, stop_at_eos, stop), sampling)

    def _stream_sync(self, prompt: str, rule: StopRule,
                     sampling: SamplingParams | None) -> Iterator[str]:
        for step in self.steps(self.tokenizer.encode(prompt), rule, sampling, text=True):
            if step.text:
                yield step.text

    async def stream_async(self, prompt: str, rule: StopRule,
                           sampling: SamplingParams | None = None):
        """Async iterator of text pieces; requests streamed concurrently (from one event
        loop) share batched decode steps (fmc.runtime.scheduler)."""
        async for step in self.steps_async(self.tokenizer.encode(prompt), rule, sampling,
                                           text=True):
            if step.text:
                yield step.text

    async def steps_async(self, prompt_ids: list[int], rule: StopRule,
                          sampling: SamplingParams | None = None, text: bool = False):
        """`steps`, joining the concurrent requests' batched decode steps."""
        from fmc.runtime.scheduler import BatchScheduler

        self.check_prompt(prompt_ids)
        if self._scheduler is None:
            self._scheduler = BatchScheduler(self)
        generation = Generation(rule, sampling, self.tokenizer if text else None)
        async for step in self._scheduler.generate(prompt_ids, generation):
            yield step

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, top_k: int = 0,
                 repetition_penalty: float = 1.0) -> str:
        sampling = SamplingParams(temperature, top_p, seed, top_k, repetition_penalty)
        ids = list(self.generate_ids(self.tokenizer.encode(prompt), max_tokens, sampling))
        return self.tokenizer.decode(ids)
