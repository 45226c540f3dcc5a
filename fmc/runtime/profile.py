"""Per-kernel time of an artifact's prefill and decode steps, through the Relax VM's
instrumentation hook (called before and after every kernel and VM builtin).

Each call is timed from just before to just after it, so the per-call cost of the hook
itself (a Python call, about a microsecond) is included; the step total is measured
separately and shows how much the hook adds."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

from fmc.errors import UsageError


class KernelTimer:
    """Accumulates (calls, seconds) per callee symbol while `active`."""

    def __init__(self):
        self.active = False
        self.stats: dict[str, list] = defaultdict(lambda: [0, 0.0])
        self._started: dict[str, float] = {}

    def __call__(self, _func, symbol, before_run, _ret, *_args):
        if self.active:
            if before_run:
                self._started[symbol] = time.perf_counter()
            else:
                entry = self.stats[symbol]
                entry[0] += 1
                entry[1] += time.perf_counter() - self._started.pop(symbol)
        return 0  # VMInstrumentReturnKind.kNoOp: run the call normally

    @contextmanager
    def measuring(self):
        self.stats.clear()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def table(self, steps: int, step_seconds: float) -> dict:
        rows = [{"kernel": name, "calls_per_step": calls / steps,
                 "ms_per_step": seconds / steps * 1e3,
                 "us_per_call": seconds / calls * 1e6,
                 "share": seconds / steps / step_seconds if step_seconds else 0.0}
                for name, (calls, seconds) in self.stats.items()]
        rows.sort(key=lambda row: -row["ms_per_step"])
        return {"step_ms": step_seconds * 1e3,
                "kernels_ms": sum(r["ms_per_step"] for r in rows), "kernels": rows}


def profile_kernels(engine, prompt_len: int = 128, decode_steps: int = 16,
                    seed: int = 0) -> dict:
    """{"prefill": table, "decode": table} for one prefill of `prompt_len` random tokens and
    `decode_steps` greedy decode steps after it (a warm-up step first)."""
    if prompt_len <= 0 or decode_steps <= 0:
        raise UsageError("--prompt-len and --gen-len must be positive")
    if prompt_len + decode_steps + 1 > engine.context_window:
        raise UsageError("prompt and decode steps exceed the context window")
    timer = KernelTimer()
    prompt = np.random.default_rng(seed).integers(0, engine.config.vocab_size,
                                                  prompt_len).tolist()
    with engine.instrumented(timer):
        seq = engine.new_sequence()
        try:
            engine.prefill(seq, prompt[:8])  # warm-up: first-call costs out of the tables
            engine.remove(seq)
            seq = engine.new_sequence()
            with timer.measuring():
                start = time.perf_counter()
                token = int(np.argmax(engine.prefill(seq, prompt)))
                prefill_seconds = time.perf_counter() - start
            prefill = timer.table(1, prefill_seconds)
            token = int(np.argmax(engine.decode(seq, token)))
            with timer.measuring():
                start = time.perf_counter()
                for _ in range(decode_steps):
                    token = int(np.argmax(engine.decode(seq, token)))
                decode_seconds = (time.perf_counter() - start) / decode_steps
            decode = timer.table(decode_steps, decode_seconds)
        finally:
            engine.remove(seq)
    return {"prompt_len": prompt_len, "decode_steps": decode_steps,
            "prefill": prefill, "decode": decode}
