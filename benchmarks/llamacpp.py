"""Build llama.cpp's tools from the sources vendored in the llama-cpp-python sdist (cached).

    python benchmarks/llamacpp.py            # builds (once) and prints the bin directory

Used by the benchmarks that compare fmc with llama.cpp side by side. Nothing of llama.cpp is
committed: the sdist comes from PyPI and is built under benchmarks/.cache/."""

from __future__ import annotations

import os
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


def build(jobs: int | None = None) -> Path:
    """Return the directory holding the llama.cpp binaries, building them if needed."""
    build_dir = CACHE / f"llama.cpp-{SDIST_VERSION}" / "build"
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
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF"])
    run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2),
         "--target", *TOOLS])
    return bin_dir


if __name__ == "__main__":
    print(build())
