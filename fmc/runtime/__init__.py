"""Runtime: load an artifact, manage its paged KV cache, generate text."""

from __future__ import annotations

__all__ = ["Engine"]


def __getattr__(name: str):
    # Lazy, like fmc.frontend: importing one runtime helper does not import the engine.
    if name == "Engine":
        from fmc.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
