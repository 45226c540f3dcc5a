"""Stacked expert weights [E, out, in] (mixture-of-experts layers) under any scheme.

Each expert's [out, in] matrix is stored in the scheme's own 2-D layout and the arrays are
stacked along a leading expert axis: a part the scheme stores as [out, …] becomes
[E, out, …]. Schemes stay 2-D. Their rows are independent by contract, so a stack
quantizes as one [E·out, in] weight whose stored arrays are split back into [E, out, …]:
bit for bit what quantizing each expert alone gives, and it takes the same row-block
parallel path (`fmc.quant.convert.quantize_rows`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fmc.quant.scheme import QuantScheme, StorageTensor


def is_stacked(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3


def per_expert(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 2-D shape a scheme sees: one expert's [out, in] (a 2-D shape as it is)."""
    return tuple(shape[1:]) if is_stacked(shape) else tuple(shape)


def storage(scheme: QuantScheme, shape: tuple[int, ...], tensor: str) -> list[StorageTensor]:
    """`scheme.storage` for a 2-D weight or a stack [E, out, in] (each part [E, …])."""
    if not is_stacked(shape):
        return scheme.storage(shape, tensor)
    experts, rows, k = shape
    return [StorageTensor(part.name, (experts, *part.shape), part.dtype)
            for part in scheme.storage((rows, k), tensor)]


def flatten(weight: np.ndarray) -> np.ndarray:
    """[E, out, in] → [E·out, in] (a view)."""
    return weight.reshape(-1, weight.shape[-1])


def split(parts: list[np.ndarray], experts: int) -> list[np.ndarray]:
    """Stored arrays of a flattened stack [E·out…, …] → [E, out…, …]."""
    return [part.reshape(experts, part.shape[0] // experts, *part.shape[1:]) for part in parts]


def dequantize(scheme: QuantScheme, stored: list[np.ndarray]) -> np.ndarray:
    """Numpy reference: stacked stored arrays → float32 [E, out, in]."""
    return np.stack([scheme.dequantize([part[e] for part in stored])
                     for e in range(stored[0].shape[0])])


class _FlatRows:
    """A stored TE tensor [E, rows, …] read as [E·rows, …], so the scheme's 2-D dequantize
    expression runs over the whole stack unchanged."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.rows = int(tensor.shape[1])
        self.shape = (int(tensor.shape[0]) * self.rows, *tensor.shape[2:])
        self.dtype = tensor.dtype

    def __call__(self, *index):
        row = index[0]
        return self.tensor[(row // self.rows, row % self.rows, *index[1:])]

    def __getitem__(self, index):
        return self(*(index if isinstance(index, tuple) else (index,)))


def dequantized_reader(scheme: QuantScheme, tensors: list, rows: int, out_dtype: str
                       ) -> Callable:
    """value(e, i, k) of expert e's dequantized weight [rows, in] from the stacked stored TE
    tensors. The dequantize stage covers the whole stack; fusion inlines it into the
    consumer (`inline-dequantize`), so only the experts a token reads are decoded."""
    dequantized = scheme.dequantize_te([_FlatRows(t) for t in tensors], out_dtype)
    return lambda e, i, k: dequantized[e * rows + i, k]
