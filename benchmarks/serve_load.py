"""`fmc serve` under load, beside llama.cpp's `llama-server`, with the same client.

    python benchmarks/serve_load.py [--fmc ARTIFACT] [--gguf FILE] [--llama-server BIN]
                                    [--concurrency 1 4 16] [--requests 4] [--rounds 2]
                                    [--max-tokens 64] [--prompt-tokens 128] [--threads N]
                                    [--skip-llama] [--fmc-variant 'LABEL=SERVE ARGS' ...]

For each server and each concurrency C, C asyncio clients (the official `openai` client,
streaming `/v1/completions`, `ignore_eos` so every request generates `--max-tokens`) each
send `--requests` requests back to back, all prompts cut from benchmarks/data. Measured per
request: time to the first token (TTFT), the gaps between streamed tokens (inter-token
latency); per run: generated tokens (the server's usage count) / wall time (aggregate
throughput). Both servers get the same threads, context and parallel sequences; they take
turns `--rounds` times (each server restarted per round) and every number is the median.

Defaults: SmolLM2 q4f16 from benchmarks/.cache/vs_llamacpp (`python benchmarks/vs_llamacpp.py`
makes it and the Q4_0 GGUF), `llama-server` built from the same vendored llama.cpp sources
as the other benchmarks (benchmarks/llamacpp.py, with the server target on). Writes
benchmarks/results/serve_load.json, prints a markdown table, and draws
docs/images/serve_load.svg when matplotlib is installed (pip install '.[bench]')."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
DEFAULT_FMC = CACHE / "vs_llamacpp" / "fmc-q4f16"
DEFAULT_GGUF = CACHE / "vs_llamacpp" / "smollm2-Q4_0.gguf"
TEXT = ROOT / "data" / "lee_background_90.txt"


def build_llama_server() -> Path:
    """llama-server from the vendored sources benchmarks/llamacpp.py builds (cached)."""
    sys.path.insert(0, str(ROOT))
    import llamacpp

    llamacpp.build()  # the sources and the other tools
    options = llamacpp.isa_options()
    source = CACHE / f"llama.cpp-{llamacpp.SDIST_VERSION}" / "src"
    build_dir = CACHE / f"llama.cpp-{llamacpp.SDIST_VERSION}" / "build-server"
    binary = build_dir / "bin" / "llama-server"
    if not binary.exists():
        llamacpp.run(["cmake", "-S", str(source), "-B", str(build_dir),
                      "-DCMAKE_BUILD_TYPE=Release", *options, "-DLLAMA_CURL=OFF",
                      "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON"])
        llamacpp.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2),
                      "--target", "llama-server"])
    return binary


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], port: int):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(CACHE / f"serve_load-{name}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{name} exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{name} did not start; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def prompts(count: int, tokens: int) -> list[str]:
    """`count` different prompts of about `tokens` tokens (≈ 0.75 words per token)."""
    words = TEXT.read_text(encoding="utf-8").split()
    size = max(1, int(tokens * 0.75))
    return [" ".join(words[(i * 37) % max(1, len(words) - size):][:size]) for i in range(count)]


async def measure(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                  texts: list[str]) -> dict:
    import openai

    # Retries: llama-server's HTTP library closes a kept-alive connection after a few
    # requests, and a request sent on it as it closes fails before any response.
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=3,
                                timeout=600)
    ttfts, gaps, tokens = [], [], 0

    async def one_client(index: int) -> None:
        nonlocal tokens
        for r in range(requests):
            prompt = texts[(index * requests + r) % len(texts)]
            start = time.perf_counter()
            last = None
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            counted = None
            async for chunk in stream:
                if chunk.usage is not None:
                    counted = chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - start)
                else:
                    gaps.append(now - last)
                last = now
            # the server's count (a chunk may carry more than one token's text); with
            # ignore_eos every request generates max_tokens
            tokens += max_tokens if counted is None else counted

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    finally:
        await client.close()
    wall = time.perf_counter() - start

    def quantile(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"concurrency": concurrency, "requests": concurrency * requests,
            "generated_tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
            "ttft_p50": quantile(ttfts, 0.5), "ttft_p99": quantile(ttfts, 0.99),
            "itl_mean": statistics.fmean(gaps) if gaps else float("nan"),
            "itl_p50": quantile(gaps, 0.5), "itl_p99": quantile(gaps, 0.99),
            "itl_max": max(gaps, default=float("nan"))}


def median_run(runs: list[dict]) -> dict:
    """Per measure, the median over rounds (one concurrency level)."""
    return {key: statistics.median(r[key] for r in runs) if key != "concurrency"
            else runs[0][key] for key in runs[0]}


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, runs in results.items():
        levels = [r["concurrency"] for r in runs]
        axes[0].plot(levels, [r["tokens_per_second"] for r in runs], marker="o", label=name)
        axes[1].plot(levels, [r["ttft_p99"] for r in runs], marker="o", label=name)
        axes[2].plot(levels, [1000 * r["itl_p99"] for r in runs], marker="o", label=name)
    for axis, title in zip(axes, ("aggregate tokens/s", "p99 TTFT (s)", "p99 ITL (ms)"),
                           strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fmc", type=Path, default=DEFAULT_FMC, help="fmc artifact")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="llama.cpp model")
    parser.add_argument("--llama-server", type=Path, help="binary (default: build it)")
    parser.add_argument("--skip-llama", action="store_true", help="fmc only")
    parser.add_argument("--fmc-variant", action="append", default=[], metavar="LABEL=ARGS",
                        help="also serve the artifact with extra `fmc serve` arguments, "
                             "e.g. 'fmc, budget 512=--busy-prefill-budget 512' (repeatable)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternations of the servers; each number is the median")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--context", type=int, default=2048, help="KV cache tokens, in all")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_load.json")
    parser.add_argument("--svg", type=Path,
                        default=ROOT.parent / "docs" / "images" / "serve_load.svg")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import vs_llamacpp  # its machine description, the same in both results files

    parallel = max(args.concurrency)
    texts = prompts(64, args.prompt_tokens)
    def fmc_server(label: str, extra: list[str]):
        return lambda port: Server(label, [
            sys.executable, "-m", "fmc.cli", "serve", str(args.fmc), "--port", str(port),
            "--name", "model", "--threads", str(args.threads),
            "--max-batch", str(min(parallel, 8)), "--max-queue", str(4 * parallel),
            "--context-window", str(args.context), "--quiet", *extra], port)

    servers = {"fmc": fmc_server("fmc", [])}
    for variant in args.fmc_variant:
        label, _, extra = variant.partition("=")
        servers[label] = fmc_server(label, shlex.split(extra))
    if not args.skip_llama:
        binary = args.llama_server or build_llama_server()
        servers["llama-server"] = lambda port: Server("llama-server", [
            str(binary), "-m", str(args.gguf), "--port", str(port), "--host", "127.0.0.1",
            "-t", str(args.threads), "-c", str(args.context), "-np", str(min(parallel, 8)),
            "--alias", "model"], port)
    rounds: dict[str, list[list[dict]]] = {name: [] for name in servers}
    for _ in range(args.rounds):  # alternated: a noisy stretch of the machine hits both
        for name, start in servers.items():
            server = start(free_port())
            try:
                asyncio.run(measure(server.url, "model", 1, 1, 8, texts))  # warm-up
                rounds[name].append([asyncio.run(measure(server.url, "model", c, args.requests,
                                                         args.max_tokens, texts))
                                     for c in args.concurrency])
            finally:
                server.stop()
    results = {name: [median_run([r[i] for r in runs]) for i in range(len(args.concurrency))]
               for name, runs in rounds.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                    "machine": vs_llamacpp.machine(), "results": results,
                                    "rounds": rounds}, indent=2) + "\n")
    print("| server | clients | tokens/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | "
          "ITL p99 (ms) | ITL max (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        for r in runs:
            print(f"| {name} | {r['concurrency']} | {r['tokens_per_second']:.1f} | "
                  f"{r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {1000 * r['itl_p50']:.1f} | "
                  f"{1000 * r['itl_p99']:.1f} | {1000 * r['itl_max']:.1f} |")
    chart(results, args.svg)


if __name__ == "__main__":
    main()
