"""Build llama.cpp's tools from the sources vendored in the llama-cpp-python sdist (cached).

    python benchmarks/llamacpp.py            # builds (once) and prints the bin directory

Used by the benchmarks that compare fmc with llama.cpp side by side. Nothing of llama.cpp is
committed: the sdist comes from PyPI and is built under benchmarks/.cache/."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_VERSION = "0.3.36"  # the version the reference numbers were measured with
CACHE = Path(__file__).parent / ".cache"
TOOLS = ("llama-perplexity", "llama-quantize", "llama-bench")


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kwargs)


# ggml's x86 instruction-set options ↔ the /proc/cpuinfo flags that allow them.
X86_OPTIONS = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_BMI2": "bmi2", "GGML_FMA": "fma",
               "GGML_F16C": "f16c", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f",
               "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
               "GGML_AVX512_BF16": "avx512_bf16"}


def isa_options() -> list[str]:
    """Every instruction set this CPU has, named explicitly, except AMX: `-DGGML_NATIVE=ON`
    turns on ggml's AMX backend on CPUs that report AMX, and on the VMs these benchmarks run
    on its kernels die (SIGILL/SIGSEGV: the tile state is not granted), so llama.cpp gets
    everything else the CPU has. Non-x86 machines keep GGML_NATIVE."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        return ["-DGGML_NATIVE=ON"]
    flags = set(cpuinfo.read_text().split())
    return ["-DGGML_NATIVE=OFF", *(f"-D{option}={'ON' if flag in flags else 'OFF'}"
                                   for option, flag in X86_OPTIONS.items())]


def build(jobs: int | None = None) -> Path:
    """Return the directory holding the llama.cpp binaries, building them if needed."""
    options = isa_options()
    tag = hashlib.sha256(" ".join(options).encode()).hexdigest()[:8]
    build_dir = CACHE / f"llama.cpp-{SDIST_VERSION}" / f"build-{tag}"
    bin_dir = build_dir / "bin"
    if all((bin_dir / tool).exists() for tool in TOOLS):
        return bin_dir
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", str(CACHE), f"llama-cpp-python=={SDIST_VERSION}"])
    source = CACHE / f"llama.cpp-{SDIST_VERSION}" / "src"
    if not source.exists():
        with tarfile.open(sdist) as archive:
            prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(source, members=[m for m in members if m.name])
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is required to build llama.cpp (apt-get install cmake)")
    run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         *options, "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF"])
    run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2),
         "--target", *TOOLS])
    return bin_dir


if __name__ == "__main__":
    print(build())
