"""The lazy weight-source interface every loader implements: an index, then one tensor at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """What a source knows about a tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # source storage type, e.g. "float32", "bfloat16", "gguf:Q4_1"
    file: Path


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
