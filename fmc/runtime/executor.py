"""What runs an artifact's library: one VM (`fmc.runtime.artifact.LocalVM`) or one VM per
tensor-parallel rank in lockstep (`fmc.runtime.tensor_parallel.DiscoRanks`). The Engine and
the KV cache are written against this interface only."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Executor(Protocol):
    ranks: int

    def __getitem__(self, function: str) -> Any:
        """Entry `function`, called with device tensors (on every rank)."""

    def builtin(self, name: str) -> Any:
        """A VM builtin by its global name (run on every rank)."""

    def first_output(self, outputs: Any) -> np.ndarray:
        """An entry's first output on the host (rank 0's)."""

    def empty(self, shape: list[int], dtype: str) -> Any:
        """A device tensor of `shape` (one per rank)."""

    def host_shape(self, shape: list[int]) -> list[int]:
        """What `to_host` makes of a device tensor of `shape`."""

    def to_host(self, tensor: Any) -> np.ndarray:
        """A device tensor on the host (every rank's, stacked along a leading axis)."""

    def from_host(self, array: np.ndarray) -> Any:
        """The inverse of `to_host`."""

    def set_instrument(self, callback: Any) -> None:
        """Call `callback` around every VM call (None removes it)."""
