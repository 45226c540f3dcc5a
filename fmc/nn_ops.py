"""Small `tvm.relax.frontend.nn` helpers shared by model definitions and quantized layers."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn


def take(table: nn.Tensor, indices: nn.Tensor, axis: int = 0, name: str = "take") -> nn.Tensor:
    """Gather along `axis` with clamped indices: a bad id reads a valid row instead of memory
    out of bounds (nn.op.take uses the unchecked "fast" mode, which can segfault)."""
    return nn.op.wrap_nested(
        relax.op.take(table._expr, indices._expr, axis=axis, mode="clip"), name=name)
