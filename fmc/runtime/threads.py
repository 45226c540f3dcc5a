"""CPU thread count for compiled kernels: --threads, else TVM_NUM_THREADS, else physical cores.

TVM's own default on some machines is a single thread; fmc sets the pool explicitly."""

from __future__ import annotations

import os

from fmc.errors import UsageError


def physical_cores() -> int:
    """Distinct (package, core) pairs this process may run on; logical CPUs as a fallback."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores: set[tuple[str, str]] = set()
    try:
        package = core = ""
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((package, core))
    except OSError:
        pass
    count = len(cores) or os.cpu_count() or 1
    return max(1, min(count, usable or count))


def default_threads() -> int:
    """TVM_NUM_THREADS when set to a positive number, else the physical core count."""
    env = os.environ.get("TVM_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else physical_cores()


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's thread pool; returns the count in use. TVM_NUM_THREADS stays set for the
    process: TVM reads it again after the pool is sized, and putting it back right after
    left the kernels on one thread (`fmc bench --threads 2` ran at `--threads 1`'s speed,
    measured 2026-12-05)."""
    import tvm

    if threads is None:
        threads = default_threads()
    if threads <= 0:
        raise UsageError(f"--threads must be positive, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return int(tvm.get_global_func("runtime.NumThreads")())
