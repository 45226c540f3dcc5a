"""Frontend: turn a model reference (directory, hub id, GGUF file, preset) into a ModelSource."""

from __future__ import annotations

__all__ = ["ModelSource", "open_model"]


def __getattr__(name: str):
    # Lazy: a command that only needs one helper module (fmc doctor: the hub settings) does
    # not import the readers and numpy with the package.
    if name in __all__:
        from fmc.frontend import source

        return getattr(source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
