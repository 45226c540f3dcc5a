"""The contract a quantization scheme implements: storage layout, numpy quantizer, TE dequant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tvm import te


@dataclass(frozen=True)
class StorageTensor:
    """One array a quantized weight is stored as. All have the weight's rows as axis 0."""

    name: str  # replaces the trailing "weight" of the parameter name ("weight", "q_weight", …)
    shape: tuple[int, ...]
    dtype: str


class QuantScheme:
    """Base class for a scheme. A subclass in one file, registered with `register`, is all a
    new scheme needs: the pipeline asks it for these members and never branches on names."""

    name: str = ""
    description: str = ""
    # Activation dtype the scheme is meant for; a target may compute in a wider type.
    compute_dtype: str = "float32"
    # Average storage bits per weight, scales included (for listings and memory estimates).
    bits_per_weight: float = 32.0
    # Scheme for the output projection (lm_head, or the tied embedding) unless overridden;
    # None keeps this scheme. 4-bit schemes keep it at 8 bits, as llama.cpp does.
    output_scheme: str | None = None
    # GGUF tensor types `from_gguf` converts without loss (e.g. ("Q8_0",)).
    gguf_types: tuple[str, ...] = ()
    # `quantize` takes whole multiples of this many rows (row-interleaved layouts: the block).
    row_granularity: int = 1
    # The reduction axis must be a multiple of this (the group or super-block size).
    block_size: int = 1
    # Scheme for a weight whose reduction axis `block_size` does not divide (the K-quants
    # fall back as llama.cpp does); None: such a weight is an error naming the tensor.
    fallback: str | None = None

    def storage(self, shape: tuple[int, ...], tensor: str) -> list[StorageTensor]:
        """The arrays a weight of `shape` [rows, reduction] is stored as; `tensor` names the
        weight in errors (e.g. a group size that does not divide the reduction axis)."""
        raise NotImplementedError

    def quantize(self, weight: np.ndarray, importance: np.ndarray | None = None
                 ) -> list[np.ndarray]:
        """Quantize one float32 weight [rows, K] to arrays matching `storage` (same order).
        `importance` [K] (from --calib: mean square of each input channel's activations) says
        how much each column's error counts; None: all alike. A plugin may omit the
        parameter; it is then never passed."""
        raise NotImplementedError

    def dequantize(self, stored: list[np.ndarray]) -> np.ndarray:
        """Numpy reference of `dequantize_te`, returning float32."""
        raise NotImplementedError

    def dequantize_te(self, stored: list[te.Tensor], out_dtype: str) -> te.Tensor:
        """The dequantize expression as a TE compute over the stored arrays (rows first);
        fusion passes inline it into the consuming matmul."""
        raise NotImplementedError

    def from_gguf(self, type_name: str, blocks: np.ndarray, shape: tuple[int, int]):
        """Stored arrays straight from a GGUF tensor's raw blocks [rows, bytes per row], for
        a type in `gguf_types`; their dequantization must equal gguf's bit for bit."""
        raise NotImplementedError

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a [rows, K] weight can be stored with this scheme (K divisible by the
        block)."""
        return len(shape) == 2 and shape[1] % self.block_size == 0

    def is_identity(self, dtype: str) -> bool:
        """True when storing with this scheme is a plain `dtype` parameter (no dequantize)."""
        return False

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description,
                "compute_dtype": self.compute_dtype, "bits_per_weight": self.bits_per_weight,
                "output_scheme": self.output_scheme, "gguf_lossless": list(self.gguf_types),
                "block_size": self.block_size, "fallback": self.fallback}
