"""Quantization schemes as plugins: one file per scheme, registered by name."""

from fmc.quant.registry import all_schemes, get, load_plugin, register
from fmc.quant.scheme import QuantScheme, StorageTensor

__all__ = ["QuantScheme", "StorageTensor", "all_schemes", "get", "load_plugin", "register"]
