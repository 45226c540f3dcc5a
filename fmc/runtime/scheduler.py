"""Concurrent generation: requests that are streamed at the same time share decode steps.

`Engine.steps_async(prompt, rule)` registers a request with the engine's scheduler and
returns an async iterator of generation steps. One scheduler task runs while requests are
active; each turn it admits new requests (their prompts prefilled together in packed forward
passes), then runs one `decode_batch` over every active sequence, passes each request's
logits row through its generation policy (fmc.runtime.generation), hands it the step, and
yields to the event loop so consumers run and new requests arrive. The model runs on the event
loop's thread: a server should give the engine a loop (thread) of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fmc.runtime.generation import Generation, Step

if TYPE_CHECKING:
    from fmc.runtime.engine import Engine


@dataclass
class _Request:
    prompt: list[int]
    generation: Generation
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: int | None = None
    last: int | None = None
    finished: bool = False  # generation ended; its sequence is removed
    cancelled: bool = False  # the consumer stopped iterating


class BatchScheduler:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # sequences per decode step, for inspection

    async def generate(self, prompt: list[int], generation: Generation) -> AsyncIterator[Step]:
        """One request's generation steps, as they are produced."""
        request = _Request(list(prompt), generation)
        if generation.finished:  # max_tokens = 0
            return
        self._waiting.append(request)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            while (step := await request.queue.get()) is not None:
                if isinstance(step, BaseException):
                    raise step
                yield step
        finally:
            request.cancelled = True  # a consumer that stops early frees its sequence

    def _emit(self, request: _Request, logits) -> None:
        engine = self.engine
        step = request.generation.step(logits, engine.history[request.seq],
                                       engine.sequence_length(request.seq))
        request.queue.put_nowait(step)
        request.last = step.token
        if step.finish_reason is not None:
            self._finish(request)

    def _finish(self, request: _Request) -> None:
        if request.finished:
            return
        if request.seq is not None and request.seq in self.engine.history:
            self.engine.remove(request.seq)
        request.finished = True
        request.queue.put_nowait(None)

    def _admit(self) -> None:
        room = self.engine.max_batch_size - len(self._active)
        new, self._waiting = self._waiting[:room], self._waiting[room:]
        new = [r for r in new if not r.cancelled]
        if not new:
            return
        for request in new:
            request.seq = self.engine.new_sequence()
        logits = self.engine.prefill_batch([r.seq for r in new], [r.prompt for r in new])
        for request, row in zip(new, logits, strict=True):
            self._active.append(request)
            self._emit(request, row)

    async def _run(self) -> None:
        try:
            while self._waiting or self._active:
                self._admit()
                for request in [r for r in self._active if r.cancelled]:
                    self._finish(request)
                self._active = [r for r in self._active if not r.finished]
                if self._active:
                    seqs = [r.seq for r in self._active]
                    logits = self.engine.decode_batch(seqs, [r.last for r in self._active])
                    self.batch_sizes.append(len(seqs))
                    for request, row in zip(self._active, logits, strict=True):
                        self._emit(request, row)
                    self._active = [r for r in self._active if not r.finished]
                await asyncio.sleep(0)
        except Exception as exc:  # hand the failure to every waiting consumer
            for request in [*self._active, *self._waiting]:
                request.queue.put_nowait(exc)
            self._active, self._waiting = [], []
