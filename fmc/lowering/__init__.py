"""Lowering: the ordered IR passes of the fuse and lower phases, and fmc's own passes."""

from fmc.lowering.pipeline import (
    PIPELINE,
    PassContext,
    PassSpec,
    load_pass_plugin,
    register_pass,
)

__all__ = ["PIPELINE", "PassContext", "PassSpec", "load_pass_plugin", "register_pass"]
