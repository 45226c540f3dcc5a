"""Continuous batching: one thread per model drives the engine, step by step.

Each turn of the loop (`EngineLoop._turn`):

1. takes newly submitted requests and drops cancelled ones (a client that went away): their
   sequences are removed, so their KV pages are free before the next step;
2. admits waiting requests, oldest first, while the batch has room for all of a request's
   `n` sequences and the KV cache has free pages for its prompt (pages reserved by prompts
   still being prefilled and one page per decoding sequence are not counted as free);
3. prefills at most `prefill_budget` prompt tokens (default: the artifact's prefill chunk),
   packed across requests with `Engine.prefill_batch`; a prompt longer than the budget is
   prefilled a budget-sized chunk per turn, so a long prompt never stalls running streams
   for more than one chunk. While sequences are decoding, whole prompts are packed only up
   to `busy_prefill_budget` tokens after the turn's first prompt or chunk (default 128):
   a burst of arrivals is spread over several short pauses of the streams instead of one
   long one;
4. runs one `decode_batch` over every decoding sequence.

A request's prompt is prefilled into one sequence; when it is complete, the sequence is
forked for choices 2…n (sharing the prompt's pages) and every choice samples from the same
logits. Every logits row goes through the runtime's one generation policy
(`fmc.runtime.generation.Generation.step`: end-of-sequence, stop strings cut exactly,
max_tokens, a full context), after the OpenAI presence/frequency penalties. When a decode
step would need more KV pages than are free, kept sequences are evicted, then the newest
sequences are preempted: removed, and later recomputed from their tokens (one prefill)
before they decode again.

Results go back to the asyncio side through `loop.call_soon_threadsafe`: each request has an
asyncio queue of `Event`s. An exception in one request's sampling fails that request only;
an exception in a batched forward fails the requests in that batch; the loop goes on."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmc.runtime.generation import Generation, StopRule
from fmc.runtime.sampling import SamplingParams
from fmc.runtime.threads import configure_threads

log = logging.getLogger("fmc.serve")


@dataclass
class Event:
    """One step of one choice, or the end of the request (`done`), or its failure."""

    choice: int = 0
    token: int | None = None
    text: str = ""
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None
    done: bool = False


@dataclass(eq=False)
class Choice:
    index: int
    generation: Generation
    seq: int | None = None
    last: int | None = None  # the token to decode next
    counts: dict[int, int] = field(default_factory=dict)  # emitted tokens → occurrences
    last_time: float = 0.0
    resume: list[int] | None = None  # tokens to recompute after a preemption
    order: int = 0  # admission order (newest are preempted first)
    matcher: Any = None  # fmc.serve.grammar.Matcher: structured output's token mask

    @property
    def finished(self) -> bool:
        return self.generation.finished


@dataclass(eq=False)
class Job:
    """A prompt (or a preempted sequence's tokens) being prefilled into `seq`."""

    request: Request
    seq: int
    tokens: list[int]
    done: int = 0
    resumed: Choice | None = None  # a preempted choice, or None for a request's prompt


class Request:
    def __init__(self, prompt: list[int], rule: StopRule, sampling: SamplingParams, n: int,
                 tokenizer, presence: float = 0.0, frequency: float = 0.0,
                 top_logprobs: int | None = None, events: asyncio.Queue | None = None,
                 base: int = 0, grammar=None):
        """`events` may be shared by several requests (one API call with several prompts);
        choice indices then start at `base`."""
        self.prompt = list(prompt)
        self.n = n
        self.presence, self.frequency = presence, frequency
        self.top_logprobs = top_logprobs  # None: no logprobs; k: the chosen token's + top k
        self.choices = []
        for i in range(n):
            seeded = sampling if sampling.seed is None else SamplingParams(
                sampling.temperature, sampling.top_p, sampling.seed + i, sampling.top_k,
                sampling.repetition_penalty)
            self.choices.append(Choice(base + i, Generation(rule, seeded, tokenizer),
                                       matcher=grammar.matcher() if grammar else None))
        self.events: asyncio.Queue[Event] = asyncio.Queue() if events is None else events
        self._loop = asyncio.get_running_loop()
        self.cancelled = False
        self.closed = False  # `done` or an error was sent
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.admitted = False
        self.cached = 0  # prompt tokens reused from a cached sequence

    def send(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    def cancel(self) -> None:
        """Called from the asyncio side when the client has gone."""
        self.cancelled = True


class QueueFull(Exception):
    pass


# Prompt tokens a turn packs after its first prompt while streams decode. Measured on
# SmolLM2 at 16 clients (docs/benchmarks.md): against the whole budget (512), the streams'
# longest pause halves and p99 inter-token latency falls 2.5×, throughput unchanged, p99
# time to first token up to 14 % later.
DEFAULT_BUSY_PREFILL_BUDGET = 128


class EngineLoop:
    def __init__(self, name: str, engine, metrics, max_batch: int | None = None,
                 max_queue: int = 64, prefill_budget: int | None = None,
                 prefix_pages: int | None = None, busy_prefill_budget: int | None = None):
        self.name = name
        self.engine = engine
        self.metrics = metrics
        self.max_batch = min(max_batch or engine.max_batch_size, engine.max_batch_size)
        self.max_queue = max_queue
        self.prefill_budget = min(prefill_budget or engine.prefill_chunk, engine.prefill_chunk)
        self.busy_prefill_budget = min(busy_prefill_budget or DEFAULT_BUSY_PREFILL_BUDGET,
                                       self.prefill_budget)
        self.page_size = engine.manifest.runtime.page_size
        self.total_pages = engine.available_pages()
        # Finished sequences kept for prefix reuse, least recently used first: seq → tokens.
        self.prefix_pages = self.total_pages // 2 if prefix_pages is None else prefix_pages
        self._retained: OrderedDict[int, list[int]] = OrderedDict()
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._jobs: list[Job] = []  # prefills in progress, oldest first
        self._decoding: list[tuple[Request, Choice]] = []
        self._preempted: deque[tuple[Request, Choice]] = deque()
        self._requests: set[Request] = set()  # admitted and not finished
        self._order = 0
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmc-engine", daemon=True)
        self.decode_steps = 0
        self.metrics.set_pages(name, self.total_pages, self.total_pages)

    # -- the asyncio side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        if all(c.finished for c in request.choices):  # max_tokens = 0: nothing to run
            for choice in request.choices:
                request.send(Event(choice.index, finish_reason=choice.generation.finish_reason))
            request.closed = True
            request.send(Event(done=True))
            return
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull()
            self._queued += 1
        self.metrics.queue_depth(self.name, self._queued)
        self._inbox.put(request)
        self._wake.set()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self._jobs)

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        # TVM keeps a thread pool per thread: this one's gets the engine's --threads too.
        configure_threads(self.engine.threads)
        while not self._stopping.is_set():
            if not (self._waiting or self._jobs or self._decoding or self._preempted):
                self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._turn()
            except Exception as exc:  # a bug in the loop itself: fail what is in flight
                log.exception("engine loop")
                for request in list(self._requests) + list(self._waiting):
                    self._fail(request, f"internal error: {type(exc).__name__}: {exc}")
        for request in list(self._requests) + list(self._waiting):
            self._fail(request, "the server is shutting down")
        while True:
            try:
                self._fail(self._inbox.get_nowait(), "the server is shutting down")
            except queue.Empty:
                break

    def _turn(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.set_pages(self.name, self.engine.available_pages(), self.total_pages)
        self.metrics.running(self.name, len(self._decoding) + len(self._jobs))
        self.metrics.prefix_cache(self.name, len(self._retained), self._retained_pages())

    # -- prefix reuse ------------------------------------------------------------------------
    def _retained_pages(self) -> int:
        """Pages the kept sequences hold (an upper bound: forks among them share pages)."""
        return sum(math.ceil(len(t) / self.page_size) for t in self._retained.values())

    def _retain(self, seq: int) -> None:
        """Keep a finished sequence for prefix reuse, within `prefix_pages`."""
        tokens = list(self.engine.history[seq])
        if math.ceil(len(tokens) / self.page_size) > self.prefix_pages or not tokens:
            self.engine.remove(seq)
            return
        self._retained[seq] = tokens
        while self._retained_pages() > self.prefix_pages:
            self._evict()

    def _evict(self, keep: int | None = None) -> bool:
        """Remove the least recently used kept sequence (not `keep`); False if none."""
        for seq in self._retained:
            if seq != keep:
                del self._retained[seq]
                self.engine.remove(seq)
                return True
        return False

    def _match(self, prompt: list[int]) -> tuple[int | None, int]:
        """(sequence, tokens) of the longest prefix of `prompt` cached in a kept or decoding
        sequence; at least one prompt token is left to prefill (its logits are needed)."""
        best, best_len = None, 0
        limit = len(prompt) - 1
        if limit <= 0:
            return None, 0
        wanted = np.asarray(prompt[:limit])
        candidates = [*self._retained.items(),
                      *((c.seq, self.engine.history[c.seq]) for _, c in self._decoding)]
        for seq, tokens in candidates:
            size = min(limit, len(tokens))
            if size <= best_len:
                continue
            differ = np.flatnonzero(wanted[:size] != np.asarray(tokens[:size]))
            common = int(differ[0]) if differ.size else size
            if common > best_len:
                best, best_len = seq, common
        if best_len < min(self.page_size, limit):
            return None, 0
        return best, best_len

    def _reuse(self, seq: int | None, common: int) -> int:
        """A sequence holding the first `common` prompt tokens: a kept sequence taken over
        (its extra tokens popped), a live one forked, or a new empty one."""
        if seq is None:
            return self.engine.new_sequence()
        if seq in self._retained:
            del self._retained[seq]
            self.engine.pop(seq, len(self.engine.history[seq]) - common)
            return seq
        return self.engine.fork(seq, at=common)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._dequeued()
            self._close(request, None)
        for request in [r for r in self._requests if r.cancelled]:
            self._release(request)
            self._close(request, None)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1
        self.metrics.queue_depth(self.name, self._queued)

    def _live(self) -> int:
        return len(self._decoding) + sum(map(self._choices, self._jobs))

    def _reserved_pages(self) -> int:
        """Pages that prefills in progress will take — with one per choice: its first decoded
        token, or the partial page a fork for choices 2…n copies — and one per decoding
        sequence."""
        pending = sum(math.ceil((len(j.tokens) - j.done) / self.page_size) + self._choices(j)
                      for j in self._jobs)
        return pending + len(self._decoding)

    @staticmethod
    def _choices(job: Job) -> int:
        """Sequences a prefill job turns into: a request's n, or the one it recomputes."""
        return job.request.n if job.resumed is None else 1

    def _free_pages(self) -> int:
        return self.engine.available_pages() - self._reserved_pages()

    def _admit(self) -> None:
        while self._preempted:  # recompute preempted sequences first
            request, choice = self._preempted[0]
            need = math.ceil(len(choice.resume) / self.page_size) + 1
            while need > self._free_pages() and self._evict():
                pass
            if self._live() + 1 > self.max_batch or need > self._free_pages():
                return
            self._preempted.popleft()
            seq = self.engine.new_sequence()
            choice.seq = seq
            self._jobs.append(Job(request, seq, choice.resume, resumed=choice))
        while self._waiting:
            request = self._waiting[0]
            if self._live() + request.n > self.max_batch:
                return
            source, common = self._match(request.prompt)
            need = math.ceil((len(request.prompt) - common) / self.page_size) + request.n
            if source is not None and source not in self._retained and common % self.page_size:
                need += 1  # forking a live sequence mid-page copies that page
            while need > self._free_pages() and self._evict(keep=source):
                pass
            if need > self._free_pages():
                if not self._requests and not self._jobs:  # alone and still no room
                    self._waiting.popleft()
                    self._dequeued()
                    self._fail(request, "the prompt does not fit the KV cache")
                    continue
                return
            self._waiting.popleft()
            self._dequeued()
            request.admitted = True
            request.cached = common
            self._requests.add(request)
            self.metrics.prompt_tokens(self.name, len(request.prompt))
            if common:
                self.metrics.reused(self.name, common)
            self._jobs.append(Job(request, self._reuse(source, common), request.prompt,
                                  done=common))

    def _prefill(self) -> None:
        # The turn's first prompt takes up to the whole budget (a long one a budget-sized
        # chunk); others join while they fit whole — in less room while streams wait.
        budget = self.busy_prefill_budget if self._decoding else self.prefill_budget
        picked: list[tuple[Job, list[int]]] = []
        reserved = sum(1 for _, c in self._decoding
                       if self.engine.sequence_length(c.seq) % self.page_size == 0)
        pages = self.engine.available_pages() - reserved
        for job in self._jobs:
            left = len(job.tokens) - job.done
            if not picked:  # whole, or a long prompt chunk by chunk
                piece = job.tokens[job.done:job.done + self.prefill_budget]
            elif left <= budget:
                piece = job.tokens[job.done:]
            else:
                continue  # would be split differently from a solo run: next turn
            need = math.ceil(len(piece) / self.page_size) + self._choices(job)
            while need > pages and self._evict():
                pages = self.engine.available_pages() - reserved
            if need > pages:
                continue  # wait for decoding sequences to finish and free pages
            pages -= need
            picked.append((job, piece))
            budget -= len(piece)
            if budget <= 0:
                break
        if not picked:
            return
        try:
            logits = self.engine.prefill_batch([j.seq for j, _ in picked],
                                               [p for _, p in picked])
        except Exception as exc:
            log.exception("prefill")
            for job, _ in picked:
                self._fail(job.request, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        for (job, piece), row in zip(picked, logits, strict=True):
            job.done += len(piece)
            if job.done < len(job.tokens):
                continue
            self._jobs.remove(job)
            request = job.request
            if job.resumed is not None:  # recomputed: decode its pending token next
                job.resumed.resume = None
                self._decoding.append((request, job.resumed))
                continue
            for choice in request.choices:
                choice.seq = job.seq if choice.index == 0 else self.engine.fork(job.seq)
                self._order += 1
                choice.order = self._order
            for choice in request.choices:
                self._step(request, choice, row)

    def _decode(self) -> None:
        self._make_room()
        if not self._decoding:
            return
        batch = list(self._decoding)
        try:
            logits = self.engine.decode_batch([c.seq for _, c in batch],
                                              [c.last for _, c in batch])
        except Exception as exc:
            log.exception("decode")
            for request in {r for r, _ in batch}:
                self._fail(request, f"decode failed: {type(exc).__name__}: {exc}")
            return
        self.decode_steps += 1
        self.metrics.decode_step(self.name, len(batch))
        for (request, choice), row in zip(batch, logits, strict=True):
            if not request.closed:
                self._step(request, choice, row)

    def _make_room(self) -> None:
        """While the step needs more pages than are free (a sequence whose length is a
        multiple of the page size starts a page), evict kept sequences, then preempt the
        newest decoding ones — the last one too while prefills in progress hold pages."""
        while self._decoding:
            need = sum(1 for _, c in self._decoding
                       if self.engine.sequence_length(c.seq) % self.page_size == 0)
            if need <= self.engine.available_pages():
                return
            if self._evict():  # kept sequences go before running ones
                continue
            if len(self._decoding) == 1 and not self._jobs:
                return  # it holds every page: its full context ends it (Generation.step)
            request, choice = max(self._decoding, key=lambda rc: rc[1].order)
            self._decoding.remove((request, choice))
            choice.resume = list(self.engine.history[choice.seq])
            self.engine.remove(choice.seq)
            choice.seq = None
            self._preempted.append((request, choice))
            self.metrics.preempted(self.name)

    def _step(self, request: Request, choice: Choice, row: np.ndarray) -> None:
        """One logits row of one choice through the generation policy → an event."""
        try:
            logits = row
            if choice.counts and (request.presence or request.frequency):
                ids = np.fromiter(choice.counts.keys(), np.int64)
                counts = np.fromiter(choice.counts.values(), np.float32)
                logits = row.copy()
                logits[ids] -= request.frequency * counts + request.presence
            if choice.matcher is not None:  # structured output: forbidden tokens at -inf
                logits = choice.matcher.apply(logits)
            step = choice.generation.step(logits, self.engine.history[choice.seq],
                                          self.engine.sequence_length(choice.seq))
            if choice.matcher is not None and step.token is not None:
                choice.matcher.consume(step.token)
            event = Event(choice.index, step.token, step.text, step.finish_reason)
            if step.token is not None and request.top_logprobs is not None:
                logprobs = _log_softmax(row)
                event.logprob = float(logprobs[step.token])
                if request.top_logprobs:
                    top = np.argsort(-logprobs, kind="stable")[:request.top_logprobs]
                    event.top_logprobs = [(int(t), float(logprobs[t])) for t in top]
        except Exception as exc:  # this request only
            log.exception("sampling")
            self._fail(request, f"generation failed: {type(exc).__name__}: {exc}")
            return
        now = time.perf_counter()
        if step.token is not None:
            choice.counts[step.token] = choice.counts.get(step.token, 0) + 1
            self.metrics.generated(self.name, 1)
            if request.first_token is None:
                request.first_token = now
                self.metrics.ttft(self.name, now - request.arrived)
            elif choice.last_time:
                self.metrics.inter_token(self.name, now - choice.last_time)
            choice.last_time = now
        if step.finish_reason is None:
            request.send(event)
            choice.last = step.token
            if (request, choice) not in self._decoding:
                self._decoding.append((request, choice))
            return
        self._decoding = [(r, c) for r, c in self._decoding if c is not choice]
        if choice.seq is not None:
            self._retain(choice.seq)  # kept for prefix reuse (or removed)
            choice.seq = None
        self._gauges()  # before the client hears of the end: /metrics then shows it freed
        request.send(event)
        if all(c.finished for c in request.choices):
            self._requests.discard(request)
            self._close(request, "ok")

    def _release(self, request: Request) -> None:
        """Remove every sequence and job of `request`."""
        self._requests.discard(request)
        self._decoding = [(r, c) for r, c in self._decoding if r is not request]
        self._preempted = deque((r, c) for r, c in self._preempted if r is not request)
        for job in [j for j in self._jobs if j.request is request]:
            self._jobs.remove(job)
            if job.seq in self.engine.history:
                self.engine.remove(job.seq)
        for choice in request.choices:
            if choice.seq is not None and choice.seq in self.engine.history:
                self.engine.remove(choice.seq)
            choice.seq = None

    def _fail(self, request: Request, message: str) -> None:
        if request in self._waiting:
            self._waiting.remove(request)
            self._dequeued()
        self._release(request)
        if not request.closed:
            request.send(Event(error=message))
        self._close(request, "error")

    def _close(self, request: Request, outcome: str | None) -> None:
        if request.closed:
            return
        request.closed = True
        if outcome == "ok":  # an error sent its own event; a cancelled request has no reader
            request.send(Event(done=True))
        self.metrics.finished(self.name, outcome or "cancelled")


def _log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    x = x - x.max()
    return x - math.log(float(np.exp(x).sum()))

