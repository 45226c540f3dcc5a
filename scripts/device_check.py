"""The GPU device check (issue #20): does a CUDA artifact run, agree with the CPU and use the
memory bandwidth? Written for a machine with an NVIDIA GPU (an H200, sm_90, first).

    scripts/device_check.sh OUTDIR [--arch sm_90] [--skip-big] [--budget 450]

Steps, each recorded in OUTDIR/device_check.json and summarised in OUTDIR/report.txt (a step
that fails is recorded with its error and the check goes on; steps that would start after
`--budget` seconds are skipped and listed):

1. the GPU (nvidia-smi) and its measured device-to-device copy bandwidth;
2. SmolLM2-135M (the default model) compiled for `cuda:ARCH` and `cpu` at q0f16 and q4f16;
3. logits of a 12-token prefill and 8 teacher-forced decode steps, GPU against CPU artifact
   of the same scheme (bound: 4e-2 of the largest logit: fp16 activations and fp16
   accumulation, the bound the Vulkan artifacts are held to), and greedy 32 tokens (equal, or
   the first divergence with the CPU's top-2 margin there: a margin under the bound is
   explained by fp16 accumulation);
4. `fmc bench` prefill/decode tokens/s, decode bytes/s as a fraction of the measured copy
   bandwidth, and `--batch` 1/4/16 scaling;
5. with two GPUs or more, a `--tensor-parallel 2` artifact (ranks are Disco workers with
   NCCL, rank r on cuda:r); with one, the record says it was not run and why;
6. the `llama-3-8b` preset with random weights written here (a fp16 checkpoint of 16 GB,
   quantized by `fmc compile --weights`), its decode tokens/s and bandwidth fraction;
7. the families whose GPU kernels are fmc's own, with random weights written here, q4f16 on
   `cuda:ARCH` against `cpu` (step 3's comparison) and their tokens/s: gemma2 (the
   `gemma-2-2b` preset at 4 layers, its sliding window cut to 8 so the 12-token prompt
   crosses it: fmc's soft-capped, windowed attention kernels) and a Qwen3-MoE
   (benchmarks/moe_prefill.py's: 64 experts, top-8, the gathered expert kernels).

Exit: 0 when every step that ran passed, 1 when one failed, 2 for bad arguments, 7 when there
is no NVIDIA GPU (the JSON and report still say so)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = [1, 504, 3458, 282, 4745, 314, 253, 1194, 30, 378, 2119, 28]
TOLERANCE = 4e-2
NO_GPU_EXIT = 7


def gpu_info(nvidia_smi: str) -> dict | None:
    """The first GPU nvidia-smi lists, or None when there is no tool or no GPU."""
    tool = shutil.which(nvidia_smi)
    if tool is None:
        return None
    done = subprocess.run([tool, "--query-gpu=name,memory.total,compute_cap,driver_version",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True)
    rows = [r for r in done.stdout.splitlines() if r.strip()] if done.returncode == 0 else []
    if not rows:
        return None
    name, memory, capability, driver = (field.strip() for field in rows[0].split(","))
    return {"name": name, "memory_mib": int(float(memory)), "compute_capability": capability,
            "driver": driver, "count": len(rows)}


def copy_bandwidth(megabytes: int = 2048, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write), through TVM's CUDA runtime."""
    import tvm

    device = tvm.cuda(0)
    count = megabytes << 18  # float32 elements
    source = tvm.runtime.empty((count,), "float32", device)
    target = tvm.runtime.empty((count,), "float32", device)
    source.copyto(target)
    device.sync()
    start = time.perf_counter()
    for _ in range(repeats):
        source.copyto(target)
    device.sync()
    return 2 * count * 4 * repeats / (time.perf_counter() - start)


def fmc(*args: str, timeout: float = 600) -> str:
    done = subprocess.run([sys.executable, "-m", "fmc.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"fmc {' '.join(args)} exited {done.returncode}: {tail}")
    return done.stdout


def compile_to(path: Path, *args: str, timeout: float = 600) -> str:
    fmc("compile", *args, "-o", str(path), "--force", timeout=timeout)
    return str(path)


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    reference, other = np.atleast_2d(reference), np.atleast_2d(other)
    return float((np.abs(other - reference).max(axis=-1)
                  / np.abs(reference).max(axis=-1)).max())


def teacher_forced(engine, prompt: list[int], steps: int, tokens: list[int] | None = None):
    """Prefill logits and `steps` decode logits, decoding `tokens` (else its own argmax)."""
    seq = engine.new_sequence()
    rows = [engine.prefill(seq, prompt)]
    chosen = []
    for step in range(steps):
        token = tokens[step] if tokens else int(np.argmax(rows[-1]))
        chosen.append(token)
        rows.append(engine.decode(seq, token))
    engine.remove(seq)
    return np.stack([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows]), chosen


def compare(cpu_artifact: Path, gpu_artifact: Path, prompt: list[int] = PROMPT) -> dict:
    """The GPU artifact against the CPU artifact of the same scheme (see the module doc)."""
    import fmc as fmc_api

    cpu, gpu = fmc_api.load(cpu_artifact), fmc_api.load(gpu_artifact)
    reference, tokens = teacher_forced(cpu, prompt, 8)
    forced, _ = teacher_forced(gpu, prompt, 8, tokens)
    error = relative_error(reference, forced)
    cpu_greedy, cpu_logits = greedy(cpu, prompt, 32)
    gpu_greedy, _ = greedy(gpu, prompt, 32)
    result = {"logits_relative_error": error, "bound": TOLERANCE, "passed": error <= TOLERANCE,
              "greedy_equal": cpu_greedy == gpu_greedy}
    if cpu_greedy != gpu_greedy:
        at = next(i for i, (a, b) in enumerate(zip(cpu_greedy, gpu_greedy, strict=False)) if a != b)
        top = np.sort(cpu_logits[at])[-2:]
        margin = float((top[1] - top[0]) / np.abs(cpu_logits[at]).max())
        result.update(first_divergence=at, cpu_top2_margin=margin,
                      divergence_explained=margin <= TOLERANCE)
        result["passed"] = result["passed"] and margin <= TOLERANCE
    return result


def greedy(engine, prompt: list[int], count: int) -> tuple[list[int], list[np.ndarray]]:
    seq = engine.new_sequence()
    logits = np.asarray(engine.prefill(seq, prompt), dtype=np.float32).reshape(-1)
    tokens, seen = [], []
    for _ in range(count):
        seen.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = np.asarray(engine.decode(seq, tokens[-1]), dtype=np.float32).reshape(-1)
    engine.remove(seq)
    return tokens, seen


def weight_bytes_per_token(artifact: Path) -> int:
    """Bytes a decode step reads: every parameter but an untied embedding table."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    tied = manifest["model"].get("tie_word_embeddings", False)
    return sum(p["bytes"] for p in manifest["params"]
               if tied or "embed_tokens" not in p["name"])


def bench(artifact: Path, bandwidth: float | None, batch: int = 1) -> dict:
    result = json.loads(fmc("bench", str(artifact), "--json", "--runs", "3", "--prompt-len",
                            "128", "--gen-len", "64", "--batch", str(batch)))
    decode = result["decode_tokens_per_s"]["median"]
    out = {"prefill_tokens_per_s": result["prefill_tokens_per_s"]["median"],
           "decode_tokens_per_s": decode, "batch": batch}
    if bandwidth and batch == 1:
        out["decode_fraction_of_copy_bandwidth"] = (
            weight_bytes_per_token(artifact) * decode / bandwidth)
    return out


def preset_config(name: str) -> dict:
    from fmc.frontend.presets import PRESETS

    return dict(PRESETS[name])


def random_checkpoint(config: dict, directory: Path) -> Path:
    """A Hugging Face llama directory with `config` and random fp16 weights (finite,
    magnitude < 2^-5) in one safetensors file: benchmarks/convert_7b.py's writer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from convert_7b import write_random_checkpoint

    return write_random_checkpoint(config, directory)


def gemma2_config() -> dict:
    return dict(preset_config("gemma-2-2b"), num_hidden_layers=4, sliding_window=8)


def gemma2_checkpoint(config: dict, directory: Path) -> Path:
    """A Hugging Face gemma2 directory with `config` and random fp16 weights (finite,
    magnitude < 2^-5; the norms' w near 0, so (1 + w) near 1), tied embeddings."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from convert_7b import write_shard

    h, width, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + norm + ".weight", (h,)) for norm in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm")]
        shapes += [(p + "self_attn.q_proj.weight", (q, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (width, h)),
                   (p + "mlp.up_proj.weight", (width, h)),
                   (p + "mlp.down_proj.weight", (h, width))]
    shapes.append(("model.norm.weight", (h,)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(
        dict(config, torch_dtype="float16", architectures=["Gemma2ForCausalLM"]), indent=1))
    write_shard(directory / "model.safetensors", shapes, np.random.default_rng(0))
    return directory


def moe_checkpoint(directory: Path) -> Path:
    """benchmarks/moe_prefill.py's random Qwen3-MoE (64 experts of width 512, top-8)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from moe_prefill import write_checkpoint

    return write_checkpoint(directory, moe=True)


def check_family(check: Check, name: str, write, work: Path, arch: str,
                 bandwidth: float | None) -> None:
    """Step 7 for one family: write its checkpoint, compile q4f16 for the GPU and the CPU,
    compare the two, bench the GPU artifact."""
    written = check.step(f"write random {name} checkpoint", lambda: str(write(
        work / f"{name}-random")))
    if written is None:
        return
    built = {}
    for target in (f"cuda:{arch}", "cpu"):
        path = work / f"{name}-q4f16-{target.split(':')[0]}"
        if check.step(f"compile {name} q4f16 {target}", lambda t=target, p=path: compile_to(
                p, written, "--target", t, "--quant", "q4f16")) is not None:
            built[target.split(":")[0]] = path
    if len(built) == 2:
        check.step(f"logits {name} q4f16", lambda: compare(built["cpu"], built["cuda"]))
    if "cuda" in built:
        check.step(f"bench {name} q4f16", lambda: bench(built["cuda"], bandwidth))


class Check:
    """Runs named steps within a time budget, recording each result or error."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.record: dict = {"steps": {}, "skipped": []}

    def step(self, name: str, action):
        if time.perf_counter() - self.start > self.budget:
            self.record["skipped"].append(name)
            self.save()
            return None
        began = time.perf_counter()
        try:
            result = action()
            entry = {"ok": not (isinstance(result, dict) and result.get("passed") is False),
                     "result": result}
        except Exception as exc:  # noqa: BLE001 - recorded; the check goes on
            result, entry = None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        entry["seconds"] = round(time.perf_counter() - began, 1)
        self.record["steps"][name] = entry
        self.save()
        return result

    def save(self) -> None:
        self.record["seconds"] = round(time.perf_counter() - self.start, 1)
        (self.out / "device_check.json").write_text(json.dumps(self.record, indent=1) + "\n")
        lines = [f"fmc device check: {self.record.get('gpu', {}).get('name', 'no GPU')}, "
                 f"{self.record['seconds']} s"]
        for name, entry in self.record["steps"].items():
            detail = entry.get("error") or json.dumps(entry.get("result"))[:300]
            lines.append(f"{'ok  ' if entry['ok'] else 'FAIL'} {name} ({entry['seconds']} s): "
                         f"{detail}")
        lines += [f"skip {name} (over the time budget)" for name in self.record["skipped"]]
        (self.out / "report.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="where device_check.json and report.txt go")
    parser.add_argument("--arch", help="CUDA architecture (default: the GPU's, e.g. sm_90)")
    parser.add_argument("--skip-big", action="store_true", help="skip the 8B preset")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds after which no new step starts (default 450)")
    parser.add_argument("--nvidia-smi", default="nvidia-smi", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.outdir.exists() and not args.outdir.is_dir():
        parser.error(f"{args.outdir} exists and is not a directory")
    args.outdir.mkdir(parents=True, exist_ok=True)
    check = Check(args.outdir, args.budget)
    gpu = gpu_info(args.nvidia_smi)
    check.record["gpu"] = gpu or {}
    if gpu is None:
        check.record["status"] = "no-gpu"
        check.save()
        print("device_check: no NVIDIA GPU on this machine (nvidia-smi is missing or lists "
              "none); nothing was run", file=sys.stderr)
        return NO_GPU_EXIT
    arch = args.arch or "sm_" + gpu["compute_capability"].replace(".", "")
    work = args.outdir / "work"
    bandwidth = check.step("copy_bandwidth", copy_bandwidth)
    artifacts = {}
    for quant in ("q0f16", "q4f16"):
        for target in (f"cuda:{arch}", "cpu"):
            path = work / f"smollm2-{quant}-{target.split(':')[0]}"
            if check.step(f"compile smollm2 {quant} {target}", lambda t=target, q=quant, p=path:
                          compile_to(p, "--target", t, "--quant", q)) is not None:
                artifacts[(quant, target.split(":")[0])] = path
    for quant in ("q0f16", "q4f16"):
        if (quant, "cuda") in artifacts and (quant, "cpu") in artifacts:
            check.step(f"logits smollm2 {quant}", lambda q=quant: compare(
                artifacts[(q, "cpu")], artifacts[(q, "cuda")]))
        if (quant, "cuda") in artifacts:
            check.step(f"bench smollm2 {quant}", lambda q=quant: bench(
                artifacts[(q, "cuda")], bandwidth))
    if ("q4f16", "cuda") in artifacts:
        for batch in (4, 16):
            check.step(f"bench smollm2 q4f16 batch {batch}", lambda b=batch: bench(
                artifacts[("q4f16", "cuda")], bandwidth, b))
    tp = work / "smollm2-q4f16-cuda-tp2"
    if gpu["count"] < 2:  # fmc's GPU ranks are NCCL workers, one device each
        check.record["tensor_parallel"] = (f"not run: {gpu['count']} GPU; --tensor-parallel 2 "
                                           "puts rank r on cuda:r through NCCL")
    elif check.step("compile smollm2 q4f16 tensor-parallel 2", lambda: compile_to(
            tp, "--target", f"cuda:{arch}", "--quant", "q4f16", "--tensor-parallel", "2")):
        check.step("run smollm2 q4f16 tensor-parallel 2 (NCCL)", lambda: fmc(
            "run", str(tp), "--prompt", "The capital of France is", "--max-tokens", "16"))
    if not args.skip_big:
        big = work / "llama-3-8b-q4f16-cuda"
        written = check.step("write random llama-3-8b checkpoint", lambda: str(
            random_checkpoint(preset_config("llama-3-8b"), work / "llama-3-8b-random")))
        if written is not None:
            if check.step("compile llama-3-8b q4f16", lambda: compile_to(
                    big, "llama-3-8b", "--weights", str(work / "llama-3-8b-random"),
                    "--target", f"cuda:{arch}", "--quant", "q4f16", timeout=900)):
                check.step("bench llama-3-8b q4f16", lambda: bench(big, bandwidth))
    check_family(check, "gemma2", lambda d: gemma2_checkpoint(gemma2_config(), d), work, arch,
                 bandwidth)
    check_family(check, "qwen3-moe", moe_checkpoint, work, arch, bandwidth)
    check.record["status"] = "passed" if all(
        e["ok"] for e in check.record["steps"].values()) else "failed"
    check.save()
    print((args.outdir / "report.txt").read_text(), end="")
    return 0 if check.record["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
