"""Mixture-of-experts prefill on the CPU: the grouped-expert GEMM against the gathered GEMVs
it replaced for prompt tokens, and against a dense model of the same active size.

    python benchmarks/moe_prefill.py [--runs 3] [--prompt-len 128] [--gen-len 32]

Three random q4f16 models with the same attention (hidden 1024, 4 layers, 16/4 heads):
- `moe`: Qwen3-MoE, 64 experts of width 512, top-8, prompts through grouped GEMMs (default);
- `moe-gathered`: the same artifact settings with prompts through the gathered GEMVs (the
  ablation switch `fmc.frontend.moe_model.GROUPED_PROMPTS`);
- `dense`: its dense twin, one MLP of width 8·512 (the same active FLOPs per token).
Each is compiled here and measured with `fmc bench --json` (median of the runs), the three
in turn in one run.

`--llamacpp` adds the side-by-side anchor: the MoE checkpoint (with SmolLM2's tokenizer, so
llama.cpp's converter takes it) converted by llama.cpp's `convert_hf_to_gguf.py` to F16 and
`llama-quantize`d to Q4_0 (its recipe: Q4_0 everywhere, the output head Q6_K); llama-bench
and `fmc bench` then run the same file (fmc compiles it with `--quant gguf`, every block kept
as stored), alternating over `--rounds`, the same prompt and generation lengths and threads.

Writes benchmarks/results/moe_prefill.json (docs/architectures.md, docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from convert_7b import write_shard  # noqa: E402
from vs_llamacpp import llama_bench, machine  # noqa: E402

RESULTS = ROOT / "results" / "moe_prefill.json"
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 4, 16, 4, 64, 49152  # SmolLM2's
EXPERTS, WIDTH, TOP_K = 64, 512, 8


def config(moe: bool) -> dict:
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB,
                  rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                  tie_word_embeddings=False, torch_dtype="float16")
    if moe:
        return dict(common, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                    num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=WIDTH,
                    intermediate_size=WIDTH * TOP_K, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[])
    return dict(common, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                intermediate_size=WIDTH * TOP_K)


def tensor_shapes(moe: bool) -> list[tuple[str, tuple[int, ...]]]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "self_attn.q_proj.weight", (q, HIDDEN)),
                   (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                   (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
                   (p + "self_attn.o_proj.weight", (HIDDEN, q)),
                   (p + "self_attn.q_norm.weight", (HEAD_DIM,)),
                   (p + "self_attn.k_norm.weight", (HEAD_DIM,)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,))]
        if moe:
            shapes.append((p + "mlp.gate.weight", (EXPERTS, HIDDEN)))
            for e in range(EXPERTS):
                x = f"{p}mlp.experts.{e}."
                shapes += [(x + "gate_proj.weight", (WIDTH, HIDDEN)),
                           (x + "up_proj.weight", (WIDTH, HIDDEN)),
                           (x + "down_proj.weight", (HIDDEN, WIDTH))]
        else:
            width = WIDTH * TOP_K
            shapes += [(p + "mlp.gate_proj.weight", (width, HIDDEN)),
                       (p + "mlp.up_proj.weight", (width, HIDDEN)),
                       (p + "mlp.down_proj.weight", (HIDDEN, width))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_checkpoint(directory: Path, moe: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config(moe), indent=1))
    write_shard(directory / "model.safetensors", tensor_shapes(moe), np.random.default_rng(0))
    return directory


def compile_artifact(checkpoint: Path, output: Path, grouped: bool) -> Path:
    from fmc.compiler import CompileOptions, compile_model
    from fmc.frontend import moe_model

    moe_model.GROUPED_PROMPTS = grouped
    try:
        compile_model(CompileOptions(model=str(checkpoint), output=output, quant="q4f16",
                                     use_cache=False))
    finally:
        moe_model.GROUPED_PROMPTS = True
    return output


def bench(artifact: Path, args) -> dict:
    out = subprocess.run([sys.executable, "-m", "fmc", "bench", str(artifact), "--json",
                          "--quiet", "--no-verify", "--prompt-len", str(args.prompt_len),
                          "--gen-len", str(args.gen_len), "--runs", str(args.runs),
                          "--threads", str(args.threads)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return {phase: result[f"{phase}_tokens_per_s"]["median"] for phase in ("prefill", "decode")}


def llamacpp_gguf(checkpoint: Path, bin_dir: Path, tmp: Path) -> Path:
    """The checkpoint as llama.cpp's own tools make it: converted to F16, then Q4_0."""
    import shutil

    from llamacpp import CACHE, SDIST_VERSION
    from vs_llamacpp import CACHE as SMOLLM2_ARTIFACTS
    from vs_llamacpp import compile_fmc

    tokenizer = SMOLLM2_ARTIFACTS / "fmc-q0f16" / "tokenizer"
    if not tokenizer.exists():
        tokenizer = compile_fmc("q0f16", "smollm2") / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, checkpoint / name)
    converter = CACHE / f"llama.cpp-{SDIST_VERSION}" / "src" / "convert_hf_to_gguf.py"
    f16, q4_0 = tmp / "moe-F16.gguf", tmp / "moe-Q4_0.gguf"
    subprocess.run([sys.executable, str(converter), str(checkpoint), "--outtype", "f16",
                    "--outfile", str(f16)], check=True, capture_output=True)
    subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(q4_0), "Q4_0"],
                   check=True, capture_output=True)
    return q4_0


def side_by_side(checkpoint: Path, tmp: Path, args) -> dict:
    """llama.cpp and fmc on one Q4_0 GGUF, alternating; medians over the rounds."""
    import statistics

    from llamacpp import build

    from fmc.compiler import CompileOptions, compile_model

    bin_dir = build()
    gguf = llamacpp_gguf(checkpoint, bin_dir, tmp)
    artifact = tmp / "moe-gguf"
    compile_model(CompileOptions(model=str(gguf), output=artifact, quant="gguf",
                                 use_cache=False))
    rounds: dict[str, list[dict]] = {"llama.cpp Q4_0": [], "fmc, the same GGUF": []}
    for _ in range(args.rounds):
        rounds["llama.cpp Q4_0"].append(llama_bench(bin_dir, gguf, args.threads,
                                                    args.prompt_len, args.gen_len, args.runs))
        rounds["fmc, the same GGUF"].append(bench(artifact, args))
    rows = {name: {phase: round(statistics.median(r[phase] for r in measured), 1)
                   for phase in ("prefill", "decode")} for name, measured in rounds.items()}
    fmc_row, anchor = rows["fmc, the same GGUF"], rows["llama.cpp Q4_0"]
    rows["ratio fmc / llama.cpp"] = {phase: round(fmc_row[phase] / anchor[phase], 2)
                                     for phase in ("prefill", "decode")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llamacpp", action="store_true",
                        help="also run llama.cpp and fmc side by side on one Q4_0 GGUF")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternations of the side-by-side pair (--llamacpp)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    os.environ.setdefault("FMC_NO_CACHE", "1")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fmc-moe-") as tmp:
        tmp = Path(tmp)
        moe = write_checkpoint(tmp / "moe-hf", moe=True)
        dense = write_checkpoint(tmp / "dense-hf", moe=False)
        artifacts = {"moe": compile_artifact(moe, tmp / "moe", grouped=True),
                     "moe-gathered": compile_artifact(moe, tmp / "moe-gathered", grouped=False),
                     "dense": compile_artifact(dense, tmp / "dense", grouped=True)}
        for name, artifact in artifacts.items():
            rows[name] = {phase: round(value, 1) for phase, value in
                          bench(artifact, args).items()}
        if args.llamacpp:
            rows.update(side_by_side(moe, tmp, args))
    for name, row in rows.items():
        print(f"{name:22s} prefill {row['prefill']:8.1f}   decode {row['decode']:7.1f}",
              flush=True)
    document = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                "settings": {k: v for k, v in vars(args).items() if k != "output"}
                | {"quant": "q4f16", "hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB,
                                          "experts": EXPERTS, "width": WIDTH, "top_k": TOP_K},
                "results": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
