"""The server's counters, gauges and histograms, rendered in Prometheus' text format
(version 0.0.4) at GET /metrics. Updated from the engine threads and the event loop, under
one lock."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

# Seconds; TTFT spans a prompt's prefill, inter-token latency one decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW = 10.0  # seconds over which fmc_generation_tokens_per_second is measured


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


def _labels(**labels) -> str:
    def escape(value) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # route, status
        self.outcomes: dict[tuple[str, str], int] = defaultdict(int)  # model, outcome
        self.prompt: dict[str, int] = defaultdict(int)
        self.generation: dict[str, int] = defaultdict(int)
        self.steps: dict[str, int] = defaultdict(int)
        self.stepped: dict[str, int] = defaultdict(int)  # sequences summed over steps
        self.preemptions: dict[str, int] = defaultdict(int)
        self.reused_tokens: dict[str, int] = defaultdict(int)
        self.prefix: dict[str, tuple[int, int]] = {}  # kept sequences, their pages
        self.queue: dict[str, int] = defaultdict(int)
        self.running_seqs: dict[str, int] = defaultdict(int)
        self.pages: dict[str, tuple[int, int]] = {}
        self.ttfts: dict[str, _Histogram] = defaultdict(lambda: _Histogram(TTFT_BUCKETS))
        self.itls: dict[str, _Histogram] = defaultdict(lambda: _Histogram(ITL_BUCKETS))
        self._recent: dict[str, deque] = defaultdict(deque)  # (time, tokens) for the rate

    # -- updates -----------------------------------------------------------------------------
    def request(self, route: str, method: str, status: int) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1

    def finished(self, model: str, outcome: str) -> None:
        with self._lock:
            self.outcomes[(model, outcome)] += 1

    def prompt_tokens(self, model: str, count: int) -> None:
        with self._lock:
            self.prompt[model] += count

    def generated(self, model: str, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generation[model] += count
            recent = self._recent[model]
            recent.append((now, count))
            while recent and recent[0][0] < now - RATE_WINDOW:
                recent.popleft()

    def decode_step(self, model: str, batch: int) -> None:
        with self._lock:
            self.steps[model] += 1
            self.stepped[model] += batch

    def preempted(self, model: str) -> None:
        with self._lock:
            self.preemptions[model] += 1

    def reused(self, model: str, count: int) -> None:
        with self._lock:
            self.reused_tokens[model] += count

    def prefix_cache(self, model: str, sequences: int, pages: int) -> None:
        with self._lock:
            self.prefix[model] = (sequences, pages)

    def queue_depth(self, model: str, depth: int) -> None:
        with self._lock:
            self.queue[model] = depth

    def running(self, model: str, count: int) -> None:
        with self._lock:
            self.running_seqs[model] = count

    def set_pages(self, model: str, free: int, total: int) -> None:
        with self._lock:
            self.pages[model] = (free, total)

    def ttft(self, model: str, seconds: float) -> None:
        with self._lock:
            self.ttfts[model].observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self.itls[model].observe(seconds)

    # -- exposition --------------------------------------------------------------------------
    def render(self, models: list[str]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        def per_model(name, kind, help_, values, default=0):
            family(name, kind, help_)
            for model in models:
                out.append(f"{name}{_labels(model=model)} {values.get(model, default)}")

        now = time.monotonic()
        with self._lock:
            family("fmc_http_requests_total", "counter", "HTTP requests by route and status.")
            for (route, method, status), count in sorted(self.requests.items()):
                out.append(f"fmc_http_requests_total"
                           f"{_labels(route=route, method=method, status=status)} {count}")
            family("fmc_requests_finished_total", "counter",
                   "Generation requests by outcome (ok, error, cancelled).")
            for (model, outcome), count in sorted(self.outcomes.items()):
                out.append(f"fmc_requests_finished_total"
                           f"{_labels(model=model, outcome=outcome)} {count}")
            per_model("fmc_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                      self.prompt)
            per_model("fmc_generation_tokens_total", "counter", "Tokens generated.",
                      self.generation)
            rate = {}
            for model in models:
                recent = [(t, c) for t, c in self._recent.get(model, ()) if
                          t >= now - RATE_WINDOW]
                rate[model] = round(sum(c for _, c in recent) / RATE_WINDOW, 3)
            per_model("fmc_generation_tokens_per_second", "gauge",
                      f"Tokens generated per second over the last {RATE_WINDOW:g} s.", rate)
            per_model("fmc_decode_steps_total", "counter", "Batched decode steps.", self.steps)
            per_model("fmc_decode_step_sequences_total", "counter",
                      "Sequences summed over decode steps (÷ steps = mean batch).",
                      self.stepped)
            per_model("fmc_preemptions_total", "counter",
                      "Sequences preempted for KV pages (recomputed later).", self.preemptions)
            per_model("fmc_prefix_reused_tokens_total", "counter",
                      "Prompt tokens taken from cached sequences instead of prefilled.",
                      self.reused_tokens)
            per_model("fmc_prefix_cache_sequences", "gauge",
                      "Finished sequences kept for prefix reuse.",
                      {m: p[0] for m, p in self.prefix.items()})
            per_model("fmc_prefix_cache_pages", "gauge",
                      "KV pages the kept sequences hold (at most; they may share pages).",
                      {m: p[1] for m, p in self.prefix.items()})
            per_model("fmc_queue_depth", "gauge", "Requests waiting for admission.",
                      self.queue)
            per_model("fmc_running_sequences", "gauge",
                      "Sequences being prefilled or decoded.", self.running_seqs)
            per_model("fmc_kv_pages_free", "gauge", "Free pages of the KV cache.",
                      {m: p[0] for m, p in self.pages.items()})
            per_model("fmc_kv_pages_used", "gauge", "Used pages of the KV cache.",
                      {m: p[1] - p[0] for m, p in self.pages.items()})
            per_model("fmc_kv_pages_total", "gauge", "Pages of the KV cache.",
                      {m: p[1] for m, p in self.pages.items()})
            for name, help_, hists, buckets in (
                    ("fmc_time_to_first_token_seconds", "Arrival to first token.",
                     self.ttfts, TTFT_BUCKETS),
                    ("fmc_inter_token_latency_seconds", "Between a choice's tokens.",
                     self.itls, ITL_BUCKETS)):
                family(name, "histogram", help_)
                for model in models:
                    hist = hists.get(model) or _Histogram(buckets)
                    for bound, count in zip(hist.buckets, hist.counts, strict=True):
                        out.append(f"{name}_bucket{_labels(model=model, le=f'{bound:g}')} "
                                   f"{count}")
                    out.append(f"{name}_bucket{_labels(model=model, le='+Inf')} {hist.count}")
                    out.append(f"{name}_sum{_labels(model=model)} {hist.sum:.6f}")
                    out.append(f"{name}_count{_labels(model=model)} {hist.count}")
        return "\n".join(out) + "\n"
