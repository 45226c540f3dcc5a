"""Shape sweep: valid model configurations through a weights-free compile that runs codegen,
on every target (issue #20). A compile must succeed or refuse with a documented error; an
internal error, or a code generator's failure (exit 8), is a finding.

    python benchmarks/shape_sweep.py --sweep [--targets cpu,cuda,...] [--limit N] [--seed S]
    python benchmarks/shape_sweep.py --hard        # only the table of known-hard cases
    python benchmarks/shape_sweep.py --presets [--targets ...]   # every preset, every target

A case is a one-layer Llama (or Qwen2, with biases) that exists only as a config: the
compile's import phase sees it as a preset (a config without weights), so import, quantize,
fuse, lower and codegen run
exactly as for `fmc compile llama-7b` (a weights-free library), and nothing is downloaded
or written but the artifact, in a temporary directory. `tests/test_shape_sweep.py` runs a
derandomized hypothesis sample and the hard table in CI; `--sweep` runs the long grid and
writes benchmarks/results/shape_sweep.json (summary in docs/targets.md). `--presets` compiles
every built-in preset (the families' published configs, weights-free, q4f16) for every target
and writes benchmarks/results/preset_targets.json."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "shape_sweep.json"
PRESET_RESULTS = ROOT / "results" / "preset_targets.json"

TARGETS = ("cpu", "cuda", "metal", "vulkan", "cpu:aarch64-linux")
HEAD_DIMS = (32, 48, 64, 80, 96, 128, 256)
# Every scheme, one per distinct group size first: 1 (q0*), 32, 64 (nf4), 256 (K-quants).
QUANTS = ("q0f32", "q0f16", "q4f16", "nf4", "q4k", "q4f32", "q4_0", "q4_1", "q5_0", "q5_1",
          "q8f16", "q5k", "q6k", "q0bf16")
GROUP_SIZE = {"q0f32": 1, "q0f16": 1, "q0bf16": 1, "nf4": 64, "q4k": 256, "q5k": 256,
              "q6k": 256}  # every other scheme: 32


def group_size(quant: str) -> int:
    return GROUP_SIZE.get(quant, 32)


@dataclass(frozen=True)
class Case:
    """One compile: the model's shape, the scheme, the ranks and the target."""

    head_dim: int = 64
    group: int = 1  # query heads per KV head
    kv_heads: int = 1
    hidden: int = 96
    intermediate: int = 160
    vocab: int = 163
    tied: bool = False
    qwen2: bool = False  # qkv biases
    quant: str = "q0f32"
    tp: int = 1
    target: str = "cpu"
    layers: int = 1
    why: str = ""  # for the table of known-hard cases

    @property
    def heads(self) -> int:
        return self.group * self.kv_heads

    def hf_config(self) -> dict:
        config = dict(model_type="qwen2" if self.qwen2 else "llama", vocab_size=self.vocab,
                      hidden_size=self.hidden, intermediate_size=self.intermediate,
                      num_hidden_layers=self.layers, num_attention_heads=self.heads,
                      num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                      tie_word_embeddings=self.tied, bos_token_id=1, eos_token_id=2)
        return config

    def label(self) -> str:
        return (f"{'qwen2' if self.qwen2 else 'llama'} head_dim={self.head_dim} "
                f"heads={self.heads} kv_heads={self.kv_heads} hidden={self.hidden} "
                f"mlp={self.intermediate} vocab={self.vocab} "
                f"{'tied' if self.tied else 'untied'} {self.quant} tp={self.tp} {self.target}")


def fits(case: Case) -> bool:
    """Whether fmc should compile `case`, rather than refuse it with a documented error: the
    ranks divide heads, KV heads and MLP width, and the group size divides each rank's
    reduction dimensions (the K-quants fall back to q5_0 where 256 does not divide)."""
    tp = case.tp
    if case.heads % tp or case.kv_heads % tp or case.intermediate % tp:
        return False
    g = 32 if group_size(case.quant) == 256 else group_size(case.quant)
    reductions = (case.hidden, case.intermediate // tp, case.heads * case.head_dim // tp)
    return all(r % g == 0 for r in reductions)


# The known-hard cases, each on the targets that matter for it; the CI test runs them all.
HARD: tuple[Case, ...] = (
    Case(head_dim=32, group=3, kv_heads=2, hidden=192, intermediate=256, quant="q4f16", tp=2,
         target="cuda:sm_80", why="TIR CSE defined a variable after its use (tree attention)"),
    Case(head_dim=256, group=2, kv_heads=1, hidden=160, intermediate=224, quant="q4f16",
         target="vulkan", why="largest head_dim: attention's shared memory"),
    Case(head_dim=256, group=4, kv_heads=1, hidden=128, intermediate=96, quant="q0f16",
         target="metal", why="largest head_dim on Metal's 32 KiB threadgroup memory"),
    Case(head_dim=80, group=7, kv_heads=1, hidden=224, intermediate=352, quant="q0f16",
         target="cuda:sm_80", why="head_dim 80 (not a power of two), 7 query heads per KV head"),
    Case(head_dim=48, group=5, kv_heads=4, hidden=192, intermediate=192, vocab=32001,
         tied=True, quant="nf4", target="vulkan", why="odd group, odd vocabulary, tied nf4"),
    Case(head_dim=96, group=2, kv_heads=4, hidden=288, intermediate=384, quant="q4f16", tp=4,
         target="cpu", why="one KV head per rank after --tensor-parallel 4"),
    Case(head_dim=64, group=1, kv_heads=3, hidden=160, intermediate=96, vocab=151, quant="q4_1",
         tp=3, target="cpu:aarch64-linux", why="one KV head per rank after 3 ranks; MHA"),
    Case(head_dim=128, group=8, kv_heads=1, hidden=96, intermediate=160, vocab=1001,
         qwen2=True, tied=True, quant="q4k", target="metal",
         why="K-quant fallback to q5_0, biases, group 8"),
    Case(head_dim=64, group=6, kv_heads=1, hidden=200, intermediate=200, vocab=99,
         quant="q4f16", target="cpu",
         why="hidden 200: q4f16's group 32 does not divide it (a clean refusal, exit 4)"),
)


def random_case(rng: random.Random, target: str) -> Case:
    """One case drawn from the whole space; about one in ten is one fmc must refuse."""
    while True:
        quant = rng.choice(QUANTS)
        g = max(32, group_size(quant))
        tp = rng.choice((1, 1, 2, 3, 4))
        kv_heads = tp * rng.choice((1, 1, 2))
        hidden = g * rng.choice((1, 3, 5, 7, 9)) if g < 256 else 256 * rng.choice((1, 3))
        if rng.random() < 0.2:  # reduction dimensions only the q0 schemes take
            hidden = rng.choice((72, 100, 136))
        case = Case(head_dim=rng.choice(HEAD_DIMS), group=rng.randint(1, 8), kv_heads=kv_heads,
                    hidden=hidden, intermediate=tp * g * rng.choice((1, 3, 5)),
                    vocab=rng.choice((97, 163, 1001, 32001, 151)), tied=rng.random() < 0.5,
                    qwen2=rng.random() < 0.3, quant=quant, tp=tp, target=target)
        if fits(case) or rng.random() < 0.1:
            return case


def random_cases(count: int, seed: int, targets=TARGETS) -> list[Case]:
    """`count` cases per target (deterministic for a seed); CUDA builds one architecture."""
    rng = random.Random(seed)
    return [random_case(rng, "cuda:sm_80" if target == "cuda" else target)
            for target in targets for _ in range(count)]


@contextlib.contextmanager
def as_preset(case: Case):
    """Make the compiler's import phase see the case's config as a weights-free model (what a
    preset is: a config, no weights, no tokenizer) for the duration of one compile."""
    import fmc.compiler
    from fmc.frontend.architectures import config_from_hf
    from fmc.frontend.source import ModelSource

    name = "shape-sweep-case"

    def open_model(reference, weights=None, tokenizer=None, **_):
        return ModelSource(config_from_hf(case.hf_config(), f"preset {name}"), None, {},
                           "preset", name)

    original = fmc.compiler.open_model
    fmc.compiler.open_model = open_model
    try:
        yield name
    finally:
        fmc.compiler.open_model = original


def attempt(make_options, workdir: Path | None = None) -> dict:
    """One compile of `make_options(output=...)` into a temporary directory; returns {"status":
    "ok" | "refused" | "failed", "exit", "message", "seconds", "left_behind"}. "failed" is
    an internal error or a code generator's failure."""
    from fmc.compiler import compile_model
    from fmc.errors import FmcError

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            compile_model(make_options(output=Path(tmp) / "out"))
            status, code, message = "ok", 0, ""
        except FmcError as exc:
            code = exc.exit_code
            status = "failed" if code in (1, 8) else "refused"
            message = str(exc)
        except Exception as exc:  # noqa: BLE001 - what the sweep looks for
            status, code = "failed", 1
            message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0][:400]
            if os.environ.get("SHAPE_SWEEP_TRACE"):
                traceback.print_exc()
        left = list(Path(tmp).iterdir())
    return {"status": status, "exit": code, "message": message[:400],
            "seconds": round(time.perf_counter() - start, 1),
            "left_behind": [p.name for p in left] if status != "ok" else []}


def compile_case(case: Case, workdir: Path | None = None) -> dict:
    """Compile `case` as a weights-free model (see `attempt` for the result)."""
    from fmc.compiler import CompileOptions

    with as_preset(case) as name:
        return attempt(functools.partial(CompileOptions, model=name, target=case.target,
                                         quant=case.quant, tensor_parallel=case.tp,
                                         use_cache=False), workdir)


def run_presets(targets, log=print) -> list[dict]:
    """Every preset for every target, weights-free, q4f16 (the default GPU scheme)."""
    from fmc.compiler import CompileOptions
    from fmc.frontend.presets import PRESETS

    results = []
    pairs = [(preset, target) for preset in sorted(PRESETS) for target in targets]
    for number, (preset, target) in enumerate(pairs, 1):
        result = {"preset": preset, "target": target, **attempt(functools.partial(
            CompileOptions, model=preset, target=target, quant="q4f16", use_cache=False))}
        results.append(result)
        log(f"[{number}/{len(pairs)}] {result['status']:8s} {result['seconds']:6.1f} s  "
            f"{preset} → {target}  {result['message'][:160]}")
    return results


def run(cases: list[Case], log=print) -> list[dict]:
    results = []
    for number, case in enumerate(cases, 1):
        result = {"case": asdict(case), **compile_case(case)}
        results.append(result)
        log(f"[{number}/{len(cases)}] {result['status']:8s} {result['seconds']:6.1f} s  "
            f"{case.label()}  {result['message'][:160]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="the long random grid + hard")
    parser.add_argument("--hard", action="store_true", help="only the known-hard table")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--limit", type=int, default=12, help="random cases per target")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--presets", action="store_true", help="every preset, every target")
    parser.add_argument("--output", default=None, help=f"default: {RESULTS.name} "
                        f"({PRESET_RESULTS.name} with --presets)")
    args = parser.parse_args()
    if not (args.sweep or args.hard or args.presets):
        parser.error("give --sweep, --hard or --presets")
    os.environ.setdefault("FMC_NO_CACHE", "1")
    import logging

    logging.getLogger("fmc").setLevel(logging.ERROR)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.presets:
        start = time.perf_counter()
        results = run_presets(targets)
        write_results(Path(args.output or PRESET_RESULTS), results, lambda r: r["target"],
                      {"seconds": round(time.perf_counter() - start)})
        return
    chosen = [c for c in HARD if c.target.split(":")[0] in {t.split(":")[0] for t in targets}
              or c.target in targets]
    if args.sweep:
        chosen += random_cases(args.limit, args.seed, targets)
    start = time.perf_counter()
    results = run(chosen)
    write_results(Path(args.output or RESULTS), results, lambda r: r["case"]["target"],
                  {"seed": args.seed, "per_target": args.limit,
                   "seconds": round(time.perf_counter() - start)})


def write_results(output: Path, results: list[dict], target_of, header: dict) -> None:
    """Write {header, summary per target, results}; exit 1 if any compile failed."""
    summary: dict[str, dict[str, int]] = {}
    for r in results:
        per = summary.setdefault(target_of(r), {"ok": 0, "refused": 0, "failed": 0})
        per[r["status"]] += 1
    document = {**header, "summary": summary, "results": results}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    sys.exit(1 if any(r["status"] == "failed" for r in results) else 0)


if __name__ == "__main__":
    main()
