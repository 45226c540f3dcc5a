"""Compilation targets as plugins: one file per target family, registered by name."""

from fmc.targets.base import Target, Tool
from fmc.targets.registry import families, get, register

__all__ = ["Target", "Tool", "families", "get", "register"]
