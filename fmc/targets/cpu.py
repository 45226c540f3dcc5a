"""`cpu`: the host CPU through LLVM (x86-64 or AArch64), with a shared library as output."""

from __future__ import annotations

from fmc.errors import UsageError
from fmc.targets.base import Target, Tool
from fmc.targets.registry import register


def host_cpu() -> str:
    """LLVM's name for this machine's CPU. `mcpu=native` is avoided on purpose: the 0.27
    wheel accepts it but emits SSE-only code (shared/docs/tvm-field-notes.md)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


class HostCPU(Target):
    name = "cpu"
    description = "host CPU via LLVM (vectorised for this machine's CPU), shared library"
    tools = (Tool("g++", "linking the shared library", "apt-get install g++"),)

    def __init__(self, mcpu: str | None = None):
        self.mcpu = mcpu or host_cpu()

    def tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu})

    def compute_dtype(self, preferred: str) -> str:
        # x86 without AVX512-FP16 has no fp16 arithmetic; fp16 weights are widened in
        # registers, so activations and the KV cache stay float32 on the CPU.
        return "float32"

    def schedule_passes(self) -> list:
        from fmc.lowering.passes.schedule_cpu_matmul import ScheduleCPUMatmul

        return [("matmul", "parallel outputs, SIMD reduction", ScheduleCPUMatmul())]

    def device(self):
        import tvm

        return tvm.cpu()


@register("cpu")
def make_cpu(variant: str | None) -> Target:
    if variant is None:
        return HostCPU()
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(variant, ""):
        raise UsageError(f"target cpu:{variant}: LLVM does not know CPU {variant!r}")
    return HostCPU(variant)
