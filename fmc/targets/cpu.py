"""`cpu`: a CPU through LLVM, with a shared library as output.

    cpu                   this machine's CPU (vectorised for it)
    cpu:<llvm-cpu>        another CPU model of this architecture, e.g. cpu:znver4
    cpu:aarch64-linux     cross-compiled for 64-bit Arm Linux (NEON), linked with ld.lld
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmc.errors import ArtifactError, UsageError
from fmc.paths import cache_dir, write_memo
from fmc.targets.base import Target, Tool
from fmc.targets.registry import register

LD_LLD = Tool("ld.lld", "linking the cross-compiled shared library", "apt-get install lld",
              alternatives=("ld.lld-16", "ld.lld-14"))
READELF = Tool("llvm-readelf", "checking the cross-compiled library", "apt-get install llvm",
               alternatives=("llvm-readelf-16", "llvm-readelf-14"))
# Cross targets: variant → (LLVM triple, LLVM CPU, readelf machine name, float32 SIMD lanes)
CROSS = {"aarch64-linux": ("aarch64-linux-gnu", "generic", "AArch64", 4)}


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this machine's CPU. `mcpu=native` is avoided on purpose: the 0.27
    wheel accepts it but emits SSE-only code (measured 7× slower). LLVM is asked once per
    CPU model and TVM version, and the answer kept in the cache directory: importing TVM
    takes seconds, and `fmc doctor` reports the name without it."""
    key = _cpu_identity()
    memo = cache_dir() / "host-cpu.json"
    try:
        known = json.loads(memo.read_text())
        if known.get("identity") == key:
            return known["llvm_cpu"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # absent or unreadable: ask LLVM
    from tvm.target import codegen

    cpu = str(codegen.llvm_get_system_cpu())
    write_memo(memo, {"identity": key, "llvm_cpu": cpu})
    return cpu


def _cpu_identity() -> str:
    """What decides LLVM's answer: the CPU model and its feature flags, and the TVM (hence
    LLVM) version."""
    import importlib.metadata

    try:
        tvm_version = importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        tvm_version = "unknown"
    described = [platform.machine(), platform.processor(), tvm_version]
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        described += [line for line in first.splitlines()
                      if line.split(":")[0].strip() in CPUINFO_IDENTITY]
    except OSError:
        pass  # not Linux: the platform strings above
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:16]


CPUINFO_IDENTITY = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags",
                    "CPU implementer", "CPU part", "Features")


# How decode GEMVs over 4-bit weights multiply (`--cpu-dot`): "float" decodes the codes to
# float32; "int8" quantizes the activations to int8 and uses the VNNI integer dot product.
CPU_DOTS = ("float", "int8")
# The integer-dot kernels use vpdpbusd (VNNI) and VBMI's byte permutes (vpermb,
# vpmultishiftqb); Cascade Lake has the first without the second.
INT8_DOT_FEATURES = ("avx512vnni", "avx512vbmi")
CPU_DOT_VARIABLE = "FMC_CPU_DOT"  # the default for --cpu-dot (CI pinning exact numerics)


class HostCPU(Target):
    name = "cpu"
    description = "host CPU via LLVM (vectorised for this machine's CPU), shared library"
    tools = (Tool("g++", "linking the shared library", "apt-get install g++"),)

    def __init__(self, mcpu: str | None = None):
        self._mcpu = mcpu  # None: this machine's, asked of LLVM when first needed
        self.dot = "float"

    @property
    def mcpu(self) -> str:
        if self._mcpu is None:
            self._mcpu = host_cpu()  # imports TVM: not for listing targets
        return self._mcpu

    @mcpu.setter
    def mcpu(self, value: str) -> None:
        self._mcpu = value

    def has_vnni(self) -> bool:
        """Whether the CPU runs the integer-dot kernels: AVX-512 VNNI and VBMI."""
        from tvm.target import codegen

        return all(codegen.target_has_features(feature, self.tvm_target())
                   for feature in INT8_DOT_FEATURES)

    def configure_dot(self, choice: str | None) -> None:
        """`--cpu-dot`: None takes FMC_CPU_DOT if set, else picks int8 where the CPU has
        AVX-512 VNNI and float elsewhere."""
        source = "--cpu-dot"
        if choice is None and os.environ.get(CPU_DOT_VARIABLE):
            choice, source = os.environ[CPU_DOT_VARIABLE], CPU_DOT_VARIABLE
        if choice is None:
            self.dot = "int8" if self.has_vnni() else "float"
            return
        if choice not in CPU_DOTS:
            raise UsageError(f"{source} {choice!r}: choose one of {', '.join(CPU_DOTS)}")
        if choice == "int8" and not self.has_vnni():
            raise UsageError(f"{source} int8 needs AVX-512 VNNI and VBMI, which LLVM CPU "
                             f"{self.mcpu!r} lacks (use --cpu-dot float)")
        self.dot = choice

    def kernel_passes(self) -> list:
        from fmc.lowering.passes.cpu_int8_dot import CPUInt8Dot

        return [CPUInt8Dot()] if self.dot == "int8" else []

    def describe_build(self) -> dict:
        return {"cpu_dot": self.dot}

    def default_tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu})

    def compute_dtype(self, preferred: str) -> str:
        # x86 without AVX512-FP16 has no fp16 arithmetic; fp16 weights are widened in
        # registers, so activations and the KV cache stay float32 on the CPU.
        return "float32"

    lanes = 16  # float32 lanes of the widest vector (AVX-512)
    row_block = 16  # one weight row per float32 lane of an AVX-512 vector

    def schedule_passes(self) -> list:
        from fmc.lowering.passes.cpu_attention import ReplaceCPUAttention
        from fmc.lowering.passes.schedule_cpu_elementwise import ScheduleCPUElementwise
        from fmc.lowering.passes.schedule_cpu_matmul import ScheduleCPUMatmul

        return [("matmul", "a SIMD lane per weight row (row-interleaved weights), parallel "
                 "row blocks; register tiles over tokens in prefill",
                 ScheduleCPUMatmul(self.lanes, self.row_block)),
                ("elementwise", "stages inlined, SIMD vectors, parallel chunks",
                 ScheduleCPUElementwise(self.lanes)),
                ("attention", "paged decode attention parallel over heads, SIMD over the "
                 "head dimension", ReplaceCPUAttention(self.lanes))]

    @contextmanager
    def codegen_hooks(self) -> Iterator[None]:
        from fmc.targets import fast_exp

        with fast_exp.lowering():
            yield



class CrossCPU(HostCPU):
    """Another OS/architecture: the library is linked with ld.lld (no cross C toolchain:
    the objects need nothing from libc; TVM's runtime resolves at load time) and checked
    with llvm-readelf. It cannot run on this machine."""

    tools = (LD_LLD, READELF)

    def __init__(self, variant: str):
        self.variant = variant
        self.dot = "float"
        self.triple, self.mcpu, self.machine, self.lanes = CROSS[variant]
        self.description = f"cross-compiled for {variant} ({self.triple}), shared library"

    def default_tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu})

    def export(self, executable, path: Path) -> None:
        linker = LD_LLD.require()

        def link(output: str, objects: list[str], options=None) -> None:
            result = subprocess.run([linker, "-shared", "-o", output, *objects],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise ArtifactError(f"{output}: ld.lld failed: {result.stderr.strip()}")

        executable.export_library(str(path), fcompile=link)

    def validate(self, library: Path, executable) -> dict:
        readelf = READELF.require()
        header = subprocess.run([readelf, "--file-header", str(library)], capture_output=True,
                                text=True).stdout
        if self.machine not in header or "DYN" not in header:
            raise ArtifactError(f"{library}: not a {self.machine} shared library")
        symbols = subprocess.run([readelf, "--dyn-syms", "--wide", str(library)],
                                 capture_output=True, text=True).stdout
        if "__tvm_ffi__library_bin" not in symbols:
            raise ArtifactError(f"{library}: does not export __tvm_ffi__library_bin")
        return {"machine": self.machine, "checked_with": "llvm-readelf"}

    def configure_dot(self, choice: str | None) -> None:
        if choice not in (None, "float"):
            raise UsageError(f"--cpu-dot {choice}: cross target cpu:{self.variant} has "
                             "only the float path")
        self.dot = "float"

    def describe_build(self) -> dict:
        return {"cross": self.variant, "cpu_dot": self.dot}


@register("cpu")
def make_cpu(variant: str | None) -> Target:
    if variant is None:
        return HostCPU()
    if variant in CROSS:
        return CrossCPU(variant)
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(variant, ""):
        raise UsageError(f"target cpu:{variant}: LLVM does not know CPU {variant!r} (cross "
                         f"targets: {', '.join(f'cpu:{c}' for c in CROSS)})")
    return HostCPU(variant)
