"""Stream a checkpoint into stored parameters: check names and shapes, quantize, one tensor
at a time."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fmc.errors import InputError
from fmc.frontend.weights import WeightSource
from fmc.quant import experts, registry
from fmc.quant.modules import QuantizedParam
from fmc.quant.stored import StoredParam

log = logging.getLogger("fmc")

# Tensors some checkpoints carry that no fmc model reads (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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


# Quantize in row blocks of about this many float32 bytes: temporaries stay bounded whatever
# the tensor's size (a 7B embedding is 0.5 GB in float32), and the scale search's many
# passes over a block stay in the core's cache (measured 2.5× faster than 64 MB blocks).
ROW_BLOCK_BYTES = 256 * 1024


def _check_finite(weights: WeightSource, name: str, arrays: list[np.ndarray],
                  allow_nonfinite: bool) -> None:
    if allow_nonfinite:
        return
    for array in arrays:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise InputError(f"{weights.index()[name].file}: tensor {name!r} holds {bad} "
                             "NaN/Inf value(s) (pass --allow-nonfinite to compile anyway)")


def takes_importance(scheme) -> bool:
    """Whether the scheme's quantizer accepts `importance` (a plugin may not)."""
    base = getattr(scheme, "base", scheme)
    return "importance" in inspect.signature(base.quantize).parameters


def quantize_rows(scheme, tensor: np.ndarray, importance: np.ndarray | None = None
                  ) -> list[np.ndarray]:
    """`scheme.quantize` over blocks of rows (schemes are row-independent by contract);
    `importance` [K] is passed on when given. Stacked experts [E, out, K] are quantized as
    [E·out, K] and each stored array split back to [E, …] (fmc.quant.experts)."""
    if experts.is_stacked(tensor.shape):
        return experts.split(quantize_rows(scheme, experts.flatten(tensor), importance),
                             tensor.shape[0])
    rows = tensor.shape[0]
    granularity = scheme.row_granularity
    step = max(1, ROW_BLOCK_BYTES // max(1, tensor[0].size * 4) // granularity) * granularity

    def quantize(block):
        block = np.asarray(block, dtype=np.float32)
        return scheme.quantize(block) if importance is None \
            else scheme.quantize(block, importance=importance)

    if step >= rows:
        return quantize(tensor)
    starts = range(0, rows, step)
    workers = min(len(starts), os.cpu_count() or 1)
    if workers > 1:  # numpy releases the GIL in the search's array passes
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda i: quantize(tensor[i:i + step]), starts))
    else:
        parts = [quantize(tensor[i:i + step]) for i in starts]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def _stored_parts(weights: WeightSource, plan: StoredParam, allow_nonfinite: bool,
                  stats: dict[str, int], importance: dict[str, np.ndarray]
                  ) -> list[np.ndarray]:
    """The arrays one source tensor becomes: GGUF blocks repacked without loss when the
    scheme supports their type, else load → check → quantize (or cast), the quantizer
    weighting each input channel by `importance` when the calibration measured it."""
    scheme = registry.get(plan.scheme) if plan.scheme else None
    raw = getattr(weights, "raw", None)
    if scheme is not None and scheme.gguf_types and raw is not None:
        type_name, blocks = raw(plan.source)
        if type_name in scheme.gguf_types:
            shape = weights.index()[plan.source].shape
            if experts.is_stacked(shape):  # [E, out, in]: the rows of every expert in turn
                flat = (shape[0] * shape[1], shape[2])
                parts = experts.split(
                    scheme.from_gguf(type_name, blocks.reshape(flat[0], -1), flat), shape[0])
            else:
                parts = scheme.from_gguf(type_name, blocks, shape)
            _check_finite(weights, plan.source, parts, allow_nonfinite)
            stats["lossless"] = stats.get("lossless", 0) + 1
            return parts
    tensor = weights.load(plan.source)
    _check_finite(weights, plan.source, [tensor], allow_nonfinite)
    if scheme is None:
        return [tensor]
    column = importance.get(plan.source)
    if column is not None and not takes_importance(scheme):
        log.warning("scheme %s ignores the calibration (its quantize takes no importance)",
                    scheme.name)
        column = None
    return quantize_rows(scheme, tensor, column)


def _leaves(plan: StoredParam) -> list[StoredParam]:
    return [leaf for member in plan.members for leaf in _leaves(member)] or [plan]


def convert(weights: WeightSource, plans: list[StoredParam], allow_nonfinite: bool = False,
            stats: dict[str, int] | None = None,
            importance: dict[str, np.ndarray] | None = None
            ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param name, stored array) in parameter order. Only the source tensors of the
    current parameter (a horizontally fused one has several) are held in memory.
    `stats` (if given) counts tensors imported losslessly from GGUF blocks; `importance`
    maps a source tensor to its input channels' activation energy (--calib)."""
    stats = {} if stats is None else stats
    importance = importance or {}
    cache: dict[str, list[np.ndarray]] = {}
    for plan in plans:
        leaves = _leaves(plan)
        needed = {leaf.source for leaf in leaves}
        for stale in set(cache) - needed:
            del cache[stale]
        pieces = []
        for leaf in leaves:
            if leaf.source not in cache:
                cache[leaf.source] = _stored_parts(weights, leaf, allow_nonfinite, stats,
                                                   importance)
            array = cache[leaf.source][leaf.part]
            if leaf.scheme is None:
                array = array.astype(leaf.dtype, copy=False)
            if tuple(array.shape) != tuple(leaf.shape) or str(array.dtype) != leaf.dtype:
                raise InputError(f"tensor {leaf.source!r}: scheme {leaf.scheme} produced "
                                 f"{array.dtype}{list(array.shape)} for {leaf.name!r}, "
                                 f"expected {leaf.dtype}{list(leaf.shape)}")
            pieces.append(array)
        yield plan.name, pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
