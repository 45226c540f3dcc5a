"""The lazy weight-source interface every loader implements: an index, then one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

# A tensor's header (name, shape, dtype, file); defined beside the safetensors reader, which
# the runtime shares, and part of this interface.
from fmc.artifacts.safetensors_reader import TensorInfo

__all__ = ["TensorInfo", "WeightSource"]


class WeightSource(Protocol):
    """Tensors under canonical (Hugging Face Llama) names, read lazily one at a time."""

    def index(self) -> dict[str, TensorInfo]:
        """Every tensor the source holds, from headers only."""
        ...

    def load(self, name: str) -> np.ndarray:
        """Read one tensor; floating types come back as float16 or float32, never bfloat16."""
        ...

    def files(self) -> list[Path]:
        """Every file the weights are read from (for depfiles and cache keys)."""
        ...
