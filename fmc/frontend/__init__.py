"""Frontend: turn a model reference (directory, hub id, GGUF file, preset) into a ModelSource."""

from fmc.frontend.source import ModelSource, open_model

__all__ = ["ModelSource", "open_model"]
