"""What one stored parameter of a compiled model is and where its data comes from: the
plan the quantize phase makes, horizontal fusion rewrites, the weights phase follows and the
build cache records (no TVM needed to read it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredParam:
    """One parameter of the compiled model and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str  # checkpoint tensor it is made from
    scheme: str | None  # quantization scheme; None for plain casts (norms, biases)
    part: int = 0  # index among the scheme's storage tensors
    # Horizontal fusion: this parameter is these parameters stacked along axis 0.
    members: tuple[StoredParam, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StoredParam:
        return cls(**{**data, "shape": tuple(data["shape"]),
                      "members": tuple(cls.from_dict(m) for m in data["members"])})
