"""fmc vs llama.cpp on the same model, same bits, same threads, side by side.

    python benchmarks/vs_llamacpp.py [--model smollm2|tinyllama-1.1b] [--rounds 3]
                                     [--threads 1 2] [--pairs q4f16:Q4_0 ...]

Models: `smollm2` (the default model, SmolLM2-135M, from its shipped Q4_1 GGUF) and
`tinyllama-1.1b` — a model where memory bandwidth decides: the `tinyllama-1.1b` preset's
shapes with random fp16 weights (seeded) and SmolLM2's tokenizer (so its vocabulary, 49 152,
instead of 32 000: the tokenizer both converters accept without a SentencePiece model),
written as a Hugging Face directory. fmc compiles that directory; llama.cpp gets the same
weights through its own converter (`convert_hf_to_gguf.py` from the vendored sources, which
needs `sentencepiece` importable) to F16, then `llama-quantize` to each type.

A pair is FMC:LLAMA, where FMC is a scheme, optionally with `/float` or `/int8` for the CPU's
dot product (`--cpu-dot`; default: the compiler's choice for this CPU).

Builds llama.cpp's `llama-bench`/`llama-quantize` from the llama-cpp-python sdist (cached,
benchmarks/llamacpp.py), makes the GGUF variants from the shipped model, compiles the fmc
artifacts, then runs the two engines alternately (`rounds` times per thread count):
`llama-bench -p 128 -n 64` and `fmc bench --prompt-len 128 --gen-len 64`. It measures this
machine's read bandwidth (numpy, one reader per thread) and reports decode as a fraction of
the roofline bandwidth / bytes of weights read per token. Writes
benchmarks/results/vs_llamacpp[_MODEL][_TAG].json, the chart
docs/images/vs_llamacpp[_MODEL][_TAG].svg
(tokens/s of both engines per pair and thread count, bars at the median, whiskers from min to
max; no suffix for smollm2) and prints a markdown table (median, min–max, fmc/llama.cpp
ratio of the medians)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "vs_llamacpp"
# fmc scheme → llama.cpp type with the same bits per weight (the pairs)
PAIRS = {"q4_0": "Q4_0", "q4f16": "Q4_0", "q4f16/float": "Q4_0", "q4k_m": "Q4_K_M",
         "q8f16": "Q8_0", "q8f16/float": "Q8_0", "q0f16": "F16"}
MODELS = ("smollm2", "tinyllama-1.1b")
PROMPT, GEN = 128, 64


def read_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s for `threads` concurrent readers summing their share of a large array (numpy
    releases the GIL in `sum`); best of `repeats`."""
    data = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=part.sum) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def suffix(model: str) -> str:
    return "" if model == "smollm2" else f"_{model}"


def tinyllama_checkpoint() -> tuple[Path, Path]:
    """The random 1.1B Hugging Face directory and llama.cpp's F16 GGUF of it (cached)."""
    import shutil

    from convert_7b import tensor_shapes, write_shard
    from llamacpp import CACHE as LLAMA_CACHE
    from llamacpp import SDIST_VERSION

    from fmc.frontend.presets import PRESETS

    directory = CACHE / "tinyllama-1.1b-random"
    f16 = CACHE / "tinyllama-1.1b-F16.gguf"
    if not (directory / "model.safetensors").exists():
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer = compile_fmc("q0f16", "smollm2") / "tokenizer"
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, directory / name)
        config = dict(PRESETS["tinyllama-1.1b"], vocab_size=49152, torch_dtype="float16",
                      architectures=["LlamaForCausalLM"])
        (directory / "config.json").write_text(json.dumps(config, indent=1))
        partial = directory / "model.safetensors.partial"
        write_shard(partial, tensor_shapes(config), np.random.default_rng(0))
        partial.rename(directory / "model.safetensors")
    if not f16.exists():
        converter = LLAMA_CACHE / f"llama.cpp-{SDIST_VERSION}" / "src" / "convert_hf_to_gguf.py"
        subprocess.run([sys.executable, str(converter), str(directory), "--outtype", "f16",
                        "--outfile", str(f16) + ".partial"], check=True, capture_output=True)
        Path(str(f16) + ".partial").rename(f16)
    return directory, f16


def gguf_variant(bin_dir: Path, source: Path, kind: str, model: str) -> Path:
    if model != "smollm2" and kind == "F16":
        return source  # converted to F16 already
    target = CACHE / f"{model}-{kind}.gguf"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source),
                        str(target), kind], check=True, capture_output=True)
    return target


def compile_fmc(row: str, model: str, checkpoint: Path | None = None) -> Path:
    """`scheme[/float|/int8]` → the compiled artifact (fmc's build cache makes a repeat
    cheap, and a changed compiler rebuilds)."""
    scheme, _, dot = row.partition("/")
    out = CACHE / f"fmc{suffix(model)}-{row.replace('/', '-')}"
    source = [str(checkpoint)] if checkpoint is not None else []
    subprocess.run([sys.executable, "-m", "fmc.cli", "compile", *source, "--quant", scheme,
                    "-o", str(out), "--force", "--quiet",
                    *(["--cpu-dot", dot] if dot else [])], check=True)
    return out


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int = PROMPT,
                gen: int = GEN, repetitions: int = 3) -> dict:
    """llama-bench's tokens/s: {"prefill" (a `prompt`-token prompt), "decode" (`gen` tokens)}."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prompt),
                          "-n", str(gen), "-t", str(threads), "-r", str(repetitions),
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    prefill = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    decode = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return {"prefill": prefill["avg_ts"], "decode": decode["avg_ts"]}


def fmc_bench(artifact: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "fmc.cli", "bench", str(artifact), "--json",
                          "--runs", "3", "--threads", str(threads), "--prompt-len",
                          str(PROMPT), "--gen-len", str(GEN)],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    return {"prefill": result["prefill_tokens_per_s"]["median"],
            "decode": result["decode_tokens_per_s"]["median"]}


def weight_bytes_per_token(artifact: Path) -> int:
    """Bytes a decode step reads: every parameter except the embedding table, which is
    gathered one row per token — unless it doubles as the output head (tied)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    tied = manifest["model"].get("tie_word_embeddings", False)
    return sum(p["bytes"] for p in manifest["params"]
               if tied or "embed_tokens" not in p["name"])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def machine() -> dict:
    """What the numbers were measured on."""
    import os
    import platform

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def chart(results: dict, model: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "fmc"  # reproducible SVG ids
    rows = results["rows"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    labels = [f"{r['fmc']} vs {r['llama.cpp']}, {r['threads']}T" for r in rows]
    positions = np.arange(len(rows))
    for ax, measure in zip(axes, ("decode", "prefill"), strict=False):
        for offset, (engine, key, color) in enumerate(
                (("fmc", "fmc", "tab:blue"), ("llama.cpp", "llamacpp", "tab:orange"))):
            stats = [r[f"{key}_{measure}"] for r in rows]
            medians = np.array([s["median"] for s in stats])
            spread = np.array([[m - s["min"] for m, s in zip(medians, stats, strict=False)],
                               [s["max"] - m for m, s in zip(medians, stats, strict=False)]])
            ax.bar(positions + (offset - 0.5) * 0.38, medians, 0.38, yerr=spread, capsize=2,
                   label=engine, color=color)
        ax.set_ylabel(f"{measure} tokens/s" + (f" ({PROMPT}-token prompt)"
                                              if measure == "prefill" else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right")
    axes[-1].set_xticks(positions, labels, fontsize=8, rotation=35, ha="right")
    info = results["machine"]
    title = {"smollm2": "SmolLM2-135M", "tinyllama-1.1b": "TinyLlama-1.1B shapes"}[model]
    axes[0].set_title(f"{title}, fmc vs llama.cpp, medians of {results['rounds']} "
                      f"alternated rounds (whiskers: min–max); {info['cpu']}, "
                      f"{info['cpus']} vCPU, {info['date']}", fontsize=9)
    fig.tight_layout()
    chart_path = ROOT.parent / "docs" / "images" / f"{name}.svg"
    chart_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(chart_path, format="svg", metadata={"Date": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", nargs="+", default=[f"{k}:{v}" for k, v in PAIRS.items()])
    parser.add_argument("--tag", default="",
                        help="suffix for the result and chart files (a partial run of some "
                             "pairs beside the full one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from llamacpp import build

    from fmc.frontend.source import default_model_path

    bin_dir = build()
    checkpoint = None
    if args.model == "smollm2":
        source = default_model_path()
    else:
        checkpoint, source = tinyllama_checkpoint()
    pairs = [tuple(p.split(":")) for p in args.pairs]
    ggufs = {kind: gguf_variant(bin_dir, source, kind, args.model) for _, kind in pairs}
    artifacts = {scheme: compile_fmc(scheme, args.model, checkpoint) for scheme, _ in pairs}
    results = {"model": args.model, "machine": {**machine(), "bandwidth_bytes_per_s": {}},
               "rows": [], "rounds": args.rounds}
    for threads in args.threads:
        bandwidth = read_bandwidth(threads)
        results["machine"]["bandwidth_bytes_per_s"][threads] = bandwidth
        for scheme, kind in pairs:
            runs = {"fmc": {"prefill": [], "decode": []}, "llama.cpp": {"prefill": [],
                                                                      "decode": []}}
            for _ in range(args.rounds):  # alternate the engines: noise hits both
                measured = {"fmc": fmc_bench(artifacts[scheme], threads),
                            "llama.cpp": llama_bench(bin_dir, ggufs[kind], threads)}
                for engine, values in measured.items():
                    for key in ("prefill", "decode"):
                        runs[engine][key].append(values[key])
            per_token = weight_bytes_per_token(artifacts[scheme])
            fmc_decode = statistics.median(runs["fmc"]["decode"])
            results["rows"].append({
                "threads": threads, "fmc": scheme, "llama.cpp": kind,
                "fmc_prefill": summary(runs["fmc"]["prefill"]),
                "fmc_decode": summary(runs["fmc"]["decode"]),
                "llamacpp_prefill": summary(runs["llama.cpp"]["prefill"]),
                "llamacpp_decode": summary(runs["llama.cpp"]["decode"]),
                "weight_bytes_per_token": per_token,
                "fmc_roofline_fraction": fmc_decode * per_token / bandwidth})
    (ROOT / "results").mkdir(exist_ok=True)
    name = f"vs_llamacpp{suffix(args.model)}{'_' + args.tag if args.tag else ''}"
    (ROOT / "results" / f"{name}.json").write_text(
        json.dumps(results, indent=1) + "\n")
    chart(results, args.model, name)
    print("| threads | fmc | llama.cpp | decode fmc | decode llama.cpp | ratio | prefill fmc "
          "| prefill llama.cpp | ratio | fmc decode / roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(stats):
        return f"{stats['median']:.1f} ({stats['min']:.1f}–{stats['max']:.1f})"

    for row in results["rows"]:
        ratios = {m: row[f"fmc_{m}"]["median"] / row[f"llamacpp_{m}"]["median"]
                  for m in ("decode", "prefill")}
        print(f"| {row['threads']} | {row['fmc']} | {row['llama.cpp']} | "
              f"{cell(row['fmc_decode'])} | {cell(row['llamacpp_decode'])} | "
              f"{ratios['decode']:.2f}× | {cell(row['fmc_prefill'])} | "
              f"{cell(row['llamacpp_prefill'])} | {ratios['prefill']:.2f}× | "
              f"{row['fmc_roofline_fraction']:.0%} |")
    for threads, bandwidth in results["machine"]["bandwidth_bytes_per_s"].items():
        print(f"read bandwidth, {threads} thread(s): {bandwidth / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
