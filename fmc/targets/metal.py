"""`metal`: Apple GPUs, built on Linux. Kernels are Metal Shading Language (MSL) from TVM's
Metal codegen, scheduled with dlight; the host code is arm64 Mach-O.

    metal          macOS arm64: model.dylib, linked with ld64.lld
    metal:ios      iOS arm64: model.a, a static library whose kernels register themselves
                   (TVM system library) for an app to link

Nothing here can run the kernels; validation type-checks every MSL kernel with clang against
a Metal standard-library shim kept in fmc (fmc/targets/metal_shim/metal_stdlib) and checks
the Mach-O files with llvm-objdump."""

from __future__ import annotations

import re
import subprocess
import tempfile
from functools import partial
from pathlib import Path

from fmc.errors import ArtifactError, UsageError
from fmc.targets.base import DlightGPUTarget, Target, Tool
from fmc.targets.registry import register

SHIM_DIR = Path(__file__).with_name("metal_shim")
MACOS_MIN = "13.0"  # Metal 3 and Apple-silicon Macs
IOS_MIN = "16.0"
LLD = Tool("ld64.lld", "linking the Mach-O dylib", "apt-get install lld",
           alternatives=("ld64.lld-18", "ld64.lld-17", "ld64.lld-16", "ld64.lld-15",
                         "ld64.lld-14"))
LLVM_AR = Tool("llvm-ar", "archiving the iOS static library", "apt-get install llvm",
               alternatives=("llvm-ar-16", "llvm-ar-14"))
CLANG = Tool("clang++", "type-checking the generated MSL kernels", "apt-get install clang",
             alternatives=("clang++-16", "clang++-14"))
OBJDUMP = Tool("llvm-objdump", "checking the Mach-O output", "apt-get install llvm",
               alternatives=("llvm-objdump-16", "llvm-objdump-14"))
CLANG_CHECK = ["--target=aarch64-linux-gnu", "-x", "c++", "-std=c++17", "-fsyntax-only",
               "-Wno-unknown-attributes", "-Wno-user-defined-literals"]


def split_kernels(source: str) -> dict[str, str]:
    """TVM joins every kernel's MSL (each with its own includes) after a `// Function:` line;
    each must be checked alone (they redeclare the same helper types)."""
    pieces = re.split(r"(?m)^// Function: ", source)[1:]
    return {piece.split("\n", 1)[0].strip(): "// Function: " + piece for piece in pieces}


def check_msl(kernels: dict[str, str], clang: str) -> list[str]:
    """Type-check each kernel; returns "kernel: first error" for each that fails."""
    failures = []
    with tempfile.TemporaryDirectory(prefix="fmc-msl-") as directory:
        for name, source in kernels.items():
            path = Path(directory) / f"{name}.metal"
            path.write_text(source)
            result = subprocess.run([clang, *CLANG_CHECK, "-isystem", str(SHIM_DIR), str(path)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error:" in line]
                failures.append(f"{name}: {(errors or [result.stderr.strip()])[0]}")
    return failures


def metal_source(executable) -> str:
    """The MSL of every kernel, from the Metal module among the executable's imports."""
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if getattr(module, "kind", "") == "metal":
            return module.inspect_source()
        pending.extend(module.imports)
    raise ArtifactError("the build produced no Metal module")


def link_dylib(output: str, objects: list[str], options=None, *, linker: str) -> None:
    """Link TVM's Mach-O objects into a macOS dylib. Symbols the host provides (TVM's FFI
    runtime) stay undefined and bind when the app loads the dylib."""
    command = [linker, "-arch", "arm64", "-platform_version", "macos", MACOS_MIN, MACOS_MIN,
               "-dylib", "-undefined", "dynamic_lookup", "-fixup_chains",
               "-install_name", f"@rpath/{Path(output).name}", "-o", output, *objects]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ArtifactError(f"{output}: ld64.lld failed: {result.stderr.strip()}")


class Metal(DlightGPUTarget):
    name = "metal"

    def __init__(self, platform: str = "macos"):
        self.platform = platform
        self.library_suffix = ".dylib" if platform == "macos" else ".a"
        self.description = ("Apple GPU (Metal), macOS arm64 dylib" if platform == "macos"
                            else "Apple GPU (Metal), iOS arm64 static library")
        self.tools = (LLD if platform == "macos" else LLVM_AR, CLANG, OBJDUMP)

    def default_tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "metal"},
                                 host={"kind": "llvm", "mtriple": f"arm64-apple-{self.platform}"})

    def build_options(self) -> dict:
        # A static library has no loader to look kernels up by symbol: the system library
        # registers them from a static constructor instead.
        return {**super().build_options(), "system_lib": self.platform == "ios"}

    def export(self, executable, path: Path) -> None:
        if self.platform == "macos":
            linker = partial(link_dylib, linker=LLD.require())
            executable.export_library(str(path), fcompile=linker)
        else:
            from tvm.support import cc

            executable.export_library(
                str(path), fcompile=partial(cc.create_staticlib, ar=LLVM_AR.require()))

    def validate(self, library: Path, executable) -> dict:
        kernels = split_kernels(metal_source(executable))
        failures = check_msl(kernels, CLANG.require())
        if failures:
            raise ArtifactError(f"{len(failures)} generated Metal kernel(s) fail to "
                                f"type-check, first: {failures[0]}")
        objdump = OBJDUMP.require()
        header = subprocess.run([objdump, "--macho", "--private-header", str(library)],
                                capture_output=True, text=True).stdout
        if "ARM64" not in header:
            raise ArtifactError(f"{library}: not an arm64 Mach-O file")
        if self.platform == "macos":
            if "DYLIB" not in header:
                raise ArtifactError(f"{library}: not a Mach-O dylib")
            exports = subprocess.run([objdump, "--macho", "--exports-trie", str(library)],
                                     capture_output=True, text=True).stdout
            symbols = sorted(set(re.findall(r"(___tvm_ffi_\w+)", exports)))
            if "___tvm_ffi__library_bin" not in symbols:
                raise ArtifactError(f"{library}: does not export the packed library "
                                    "(___tvm_ffi__library_bin)")
            return {"msl_kernels": len(kernels), "checked_with": "clang+llvm-objdump",
                    "exported_symbols": len(symbols)}
        if "OBJECT" not in header:
            raise ArtifactError(f"{library}: not an archive of Mach-O objects")
        sections = subprocess.run([objdump, "--macho", "--section-headers", str(library)],
                                  capture_output=True, text=True).stdout
        if "__mod_init_func" not in sections:  # the constructor that registers the kernels
            raise ArtifactError(f"{library}: has no static initializer to register its "
                                "kernels (not a TVM system library)")
        return {"msl_kernels": len(kernels), "checked_with": "clang+llvm-objdump"}

    def describe_build(self) -> dict:
        minimum = MACOS_MIN if self.platform == "macos" else IOS_MIN
        return {"platform": self.platform, "min_os": minimum}


@register("metal")
def make_metal(variant: str | None) -> Target:
    if variant not in (None, "macos", "ios"):
        raise UsageError(f"target metal:{variant}: variants are metal (macOS) and metal:ios")
    return Metal(variant or "macos")
