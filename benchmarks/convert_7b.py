"""Bounded-memory conversion: a 7B-shaped random fp16 Llama checkpoint → quantized artifacts.

    python benchmarks/convert_7b.py [--quant q4f16 q4k_m …] [--keep]

Writes a checkpoint with the `llama-7b` preset's shapes (6.74 B weights, ~13.5 GB fp16) in
Hugging Face's sharded safetensors layout under benchmarks/.cache/llama7b-random/, then for
each scheme or recipe runs `fmc compile llama-7b --weights … --quant Q` in a fresh child
process and reports its wall time and peak RSS (getrusage of that child alone). Random
values are fp16 bit patterns with a bounded exponent (|w| < 2^-5). Results accumulate per
scheme in benchmarks/results/convert_7b.json."""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
CHECKPOINT = CACHE / "llama7b-random"
OUTPUT = CACHE / "llama7b-quantized"
RESULTS = ROOT / "results" / "convert_7b.json"
SHARD_BYTES = 5 * 10**9  # like HF's default 5 GB shards


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """A llama checkpoint's tensors for an HF `config`, in the order they are written."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = (config[key] * head_dim for key in ("num_attention_heads", "num_key_value_heads"))
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes.append(("model.norm.weight", (h,)))
    return shapes if config.get("tie_word_embeddings") else shapes + [("lm_head.weight", (v, h))]


def random_fp16(shape, rng) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    # keep sign and mantissa, force a small exponent: finite values of magnitude < 2^-5
    return ((bits & np.uint16(0x83FF)) | np.uint16(0x2000)).view(np.float16)


def write_shard(path: Path, names: list[tuple[str, tuple[int, ...]]], rng) -> None:
    """Stream one safetensors file: header, then each tensor generated and written in turn."""
    header, offset = {}, 0
    for name, shape in names:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for _, shape in names:
            handle.write(random_fp16(shape, rng).tobytes())


def write_random_checkpoint(config: dict, directory: Path,
                            shard_bytes: int | None = None) -> Path:
    """A Hugging Face llama directory with `config` and random fp16 weights (random_fp16),
    streamed tensor by tensor: in shards of at most `shard_bytes` with their index, or with
    None in one model.safetensors. Also used by scripts/device_check.py."""
    config = dict(config, torch_dtype="float16", architectures=["LlamaForCausalLM"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    shapes = tensor_shapes(config)
    rng = np.random.default_rng(0)
    if shard_bytes is None:
        write_shard(directory / "model.safetensors", shapes, rng)
        return directory
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_shard(directory / file, names, rng)
        weight_map.update({name: file for name, _ in names})
        print(f"wrote {file}", file=sys.stderr, flush=True)
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return directory


def make_checkpoint() -> None:
    sys.path.insert(0, str(ROOT.parent))
    from fmc.frontend.presets import PRESETS

    if not (CHECKPOINT / "model.safetensors.index.json").exists():
        write_random_checkpoint(PRESETS["llama-7b"], CHECKPOINT, SHARD_BYTES)


# Run in a fresh interpreter per scheme, so RUSAGE_CHILDREN is that one compile's peak.
MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def convert(quant: str) -> dict:
    output = OUTPUT.with_name(f"{OUTPUT.name}-{quant}")
    command = [sys.executable, "-m", "fmc.cli", "compile", "llama-7b", "--weights",
               str(CHECKPOINT), "--quant", quant, "-o", str(output), "--force", "--no-cache",
               "--quiet"]
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], check=True,
                          capture_output=True, text=True)
    seconds, peak_kib = done.stdout.split()
    artifact_bytes = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return {"compile_seconds": float(seconds), "peak_rss_bytes": int(peak_kib) * 1024,
            "artifact_bytes": artifact_bytes, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant", nargs="+", default=["q4f16", "q4k_m"])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and artifacts")
    args = parser.parse_args()
    start = time.perf_counter()
    make_checkpoint()
    generated = time.perf_counter() - start
    checkpoint_bytes = sum(p.stat().st_size for p in CHECKPOINT.glob("*.safetensors"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {k: v for k, v in results.items() if isinstance(v, dict)}  # per scheme
    for quant in args.quant:
        measured = convert(quant)
        output = measured.pop("output")
        results[quant] = {**measured, "checkpoint_bytes": checkpoint_bytes,
                          "checkpoint_generation_seconds": generated}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(quant, json.dumps(results[quant], sort_keys=True), flush=True)
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(CHECKPOINT, ignore_errors=True)


if __name__ == "__main__":
    main()
