"""Runtime: load an artifact, manage its paged KV cache, generate text."""

from fmc.runtime.engine import Engine

__all__ = ["Engine"]
