"""RMSNorm fusions: norm→GEMM (the norm is the first stage of the matmul kernel that consumes
it) and add→norm (the residual add and the following norm in one kernel, which also returns
the sum for the residual stream). Run after the matmul kernels have their epilogues (the
residual add of o_proj/down_proj), the two together give GEMM→add→norm→GEMM per layer
boundary. When that pays is in docs/design.md ("Fusion")."""

from __future__ import annotations

import tvm

from fmc.lowering.passes.merge_kernels import has_matmul, merge_kernels

NORM_BLOCK = "T_rms_norm"  # the block LegalizeOps emits for R.nn.rms_norm


def _first(names: list[str], marker: str) -> int | None:
    return next((i for i, name in enumerate(names) if marker in name), None)


def ends_in_norm(_name: str, names: list[str]) -> bool:
    """A kernel whose result is a norm's output: a norm, or an add→norm, not yet a GEMM."""
    return NORM_BLOCK in names and _first(names, "matmul") is None


def ends_in_add(_name: str, names: list[str]) -> bool:
    """A residual add: an add kernel, or a matmul whose epilogue is the add."""
    return bool(names) and names[-1].startswith("T_add")


def starts_with_norm(_name: str, names: list[str]) -> bool:
    """A norm kernel, or a norm→GEMM kernel (the norm comes before any matmul)."""
    norm, matmul = _first(names, NORM_BLOCK), _first(names, "matmul")
    return norm is not None and (matmul is None or norm < matmul)


@tvm.transform.module_pass(opt_level=0, name="FuseNormMatmul")
class FuseNormMatmul:
    """RMSNorm → matmul: the kernel computing the norm also runs the matmul reading it."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return merge_kernels(mod, "norm_matmul", ends_in_norm, has_matmul)


@tvm.transform.module_pass(opt_level=0, name="FuseAddNorm")
class FuseAddNorm:
    """Residual add → RMSNorm: one kernel writes both the sum and its norm."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return merge_kernels(mod, "add_norm", ends_in_add, starts_with_norm)
