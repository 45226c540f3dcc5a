"""The registry of quantization schemes: built-ins register on import, plugins from files."""

from __future__ import annotations

from pathlib import Path

from fmc.errors import UsageError, unknown_choice
from fmc.plugins import import_builtins, import_registering
from fmc.quant.scheme import QuantScheme

SCHEMES: dict[str, QuantScheme] = {}
# Modules of fmc.quant that are not schemes (every other module registers one or more).
INFRASTRUCTURE = {"registry", "scheme", "plan", "modules", "convert", "packing", "layout",
                  "search", "kquant", "recipe", "calibration"}


def register(scheme: QuantScheme) -> QuantScheme:
    """Add a scheme; a plugin may replace a built-in of the same name on purpose."""
    if not scheme.name:
        raise UsageError(f"quantization scheme {type(scheme).__name__} has no name")
    SCHEMES[scheme.name] = scheme
    return scheme


def _load_builtins() -> None:
    import_builtins("fmc.quant", INFRASTRUCTURE)


def load_plugin(path: str | Path) -> list[str]:
    """Import a user's scheme file; returns the names it registered."""
    _load_builtins()
    return import_registering(path, "quantization plugin", SCHEMES,
                              "quantization scheme (call fmc.quant.register)")


def split_name(name: str) -> tuple[str, int | None]:
    """`q4f16_rows16` → ("q4f16", 16); a plain name → (name, None)."""
    from fmc.quant.layout import split_name as split

    return split(name)


def get(name: str) -> QuantScheme:
    """A scheme by name; `NAME_rowsB` is NAME stored row-interleaved (fmc.quant.layout)."""
    from fmc.quant.layout import interleave

    _load_builtins()
    base, block = (name, None) if name in SCHEMES else split_name(name)
    if base not in SCHEMES:
        raise unknown_choice("quantization scheme", name, list(SCHEMES))
    return SCHEMES[base] if block is None else interleave(SCHEMES[base], block)


def by_gguf_type() -> dict[str, QuantScheme]:
    """GGML type name → the scheme that stores it losslessly (built-ins first)."""
    _load_builtins()
    found: dict[str, QuantScheme] = {}
    for scheme in SCHEMES.values():
        for type_name in scheme.gguf_types:
            found.setdefault(type_name, scheme)
    return found


def all_schemes() -> dict[str, QuantScheme]:
    _load_builtins()
    return dict(sorted(SCHEMES.items()))
