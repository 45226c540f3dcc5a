"""Stream a checkpoint into stored parameters: check names and shapes, quantize, tensor by tensor."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fmc.errors import InputError
from fmc.frontend.weights import WeightSource
from fmc.quant import registry
from fmc.quant.modules import QuantizedParam

log = logging.getLogger("fmc")

# Tensors some checkpoints carry that no fmc model reads (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class StoredParam:
    """One parameter of the compiled model and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str  # checkpoint tensor it is made from
    scheme: str | None  # quantization scheme; None for plain casts (norms, biases)
    part: int = 0  # index among the scheme's storage tensors


def plan_params(params: list[tuple[str, tuple[int, ...], str]],
                quantized: dict[str, QuantizedParam]) -> list[StoredParam]:
    """Map each exported parameter to its checkpoint tensor and scheme; parameters that are
    not quantized storage are the checkpoint tensor of the same name, cast."""
    plans = []
    for name, shape, dtype in params:
        q = quantized.get(name)
        if q is None:
            plans.append(StoredParam(name, shape, dtype, name, None))
        else:
            plans.append(StoredParam(name, shape, dtype, q.source, q.scheme, q.part))
    return plans


def check_source(weights: WeightSource, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Fail on a missing tensor or a wrong shape, before any compile work; return the names of
    extra tensors (the caller warns)."""
    index = weights.index()
    for name, shape in expected.items():
        info = index.get(name)
        if info is None:
            files = sorted({str(i.file) for i in index.values()}) or ["<no files>"]
            raise InputError(f"{files[0]}: tensor {name!r} is missing from the checkpoint")
        if tuple(info.shape) != tuple(shape):
            raise InputError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                             f"expected {list(shape)} from the config")
    return sorted(n for n in index if n not in expected and not n.endswith(IGNORED_SUFFIXES))


def convert(weights: WeightSource, plans: list[StoredParam],
            allow_nonfinite: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param name, stored array) in parameter order; one source tensor in memory."""
    current_source, current_parts = None, None
    for plan in plans:
        if plan.source != current_source:
            current_source = plan.source
            tensor = weights.load(plan.source)
            if not allow_nonfinite and tensor.dtype.kind == "f" and not np.isfinite(tensor).all():
                bad = int((~np.isfinite(tensor)).sum())
                raise InputError(f"tensor {plan.source!r} holds {bad} NaN/Inf value(s) "
                                 "(pass --allow-nonfinite to compile anyway)")
            if plan.scheme is None:
                current_parts = [tensor]
            else:
                current_parts = registry.get(plan.scheme).quantize(
                    np.asarray(tensor, dtype=np.float32))
            del tensor
        array = current_parts[plan.part]
        if plan.scheme is None:
            array = array.astype(plan.dtype, copy=False)
        if tuple(array.shape) != tuple(plan.shape) or str(array.dtype) != plan.dtype:
            raise InputError(f"tensor {plan.source!r}: scheme {plan.scheme} produced "
                             f"{array.dtype}{list(array.shape)} for {plan.name!r}, expected "
                             f"{plan.dtype}{list(plan.shape)}")
        yield plan.name, array
