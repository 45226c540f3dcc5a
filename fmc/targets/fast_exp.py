"""A float32 `exp` LLVM can vectorise, for the CPU targets.

TVM lowers `tirx.exp` on LLVM targets to `llvm.exp`, which x86 code generation turns into one
libm `expf` call per lane: SiLU's sigmoid over a 128×1536 prefill tile then costs ~0.9 ms.
This is the usual Cody–Waite range reduction (x = n·ln2 + r) with a degree-6 polynomial for
e^r and 2^n built in the exponent bits — plain vector arithmetic. Measured over
[-87, 88] (1M points): max relative error 8.3e-8 (1.4 ulp); 8× faster on the SiLU kernel.
Results below float32's smallest normal (x < −87.3) are 0 instead of subnormal; inputs are
clamped to ±88.38."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import tirx

LIMIT = 88.3762626647949  # |x| beyond this over/underflows float32 anyway
LOG2E = 1.44269504088896341
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 = HIGH + LOW; n·HIGH is exact
POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
              1.6666665459e-1, 5.0000001201e-1)

# TVM's lowering table is an attribute of the `tirx.exp` op; its own entry has the default
# priority, which a registration at a higher one overrides.
LOWERING_ATTR = "llvm.FLowerIntrinsic"
TVM_LEVEL, FMC_LEVEL = 10, 99
_depth = 0  # nesting of `lowering()` blocks in this process


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for a float32 scalar or vector expression."""
    from tvm import tirx

    lanes = x.ty.dtype.lanes

    def const(value, dtype="float32"):
        scalar = tirx.const(value, dtype)
        return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)

    x = tirx.max(tirx.min(x, const(LIMIT)), const(-LIMIT))
    n = tirx.floor(x * const(LOG2E) + const(0.5))
    r = x - n * const(LN2_HIGH) - n * const(LN2_LOW)
    p = const(POLYNOMIAL[0])
    for coefficient in POLYNOMIAL[1:]:
        p = p * r + const(coefficient)
    p = p * r * r + r + const(1.0)
    int_type = "int32" if lanes == 1 else f"int32x{lanes}"
    two_to_n = tirx.reinterpret(str(x.ty.dtype),
                                (n.astype(int_type) + const(127, "int32")) << const(23, "int32"))
    return p * two_to_n


@contextmanager
def lowering() -> Iterator[None]:
    """LLVM builds inside the block lower float32 `exp` this way (other dtypes keep TVM's
    lowering); TVM's own lowering is put back after, so builds outside it — another target's,
    or a user's `tvm.compile` in the same process — are untouched."""
    global _depth
    import tvm
    from tvm import tirx

    if _depth:  # already in effect (a nested build)
        yield
        return
    op = tvm.ir.Op.get("tirx.exp")
    tvm_lowering = op.get_attr(LOWERING_ATTR)

    def lower_exp(call: tirx.Call) -> tirx.PrimExpr:
        dtype = call.args[0].ty.dtype
        if dtype.type_code == 2 and dtype.bits == 32:  # float32, any lane count
            return fast_exp(call.args[0])
        return tvm_lowering(call)

    tirx.register_intrin_lowering("tirx.exp", target="llvm", f=lower_exp, level=FMC_LEVEL)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        op.reset_attr(LOWERING_ATTR)
        op.set_attr(LOWERING_ATTR, tvm_lowering, TVM_LEVEL)
