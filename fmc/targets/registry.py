"""Target registry: `name` or `name:variant` → a Target instance; one file per target family."""

from __future__ import annotations

from collections.abc import Callable

from fmc.errors import unknown_choice
from fmc.plugins import import_builtins
from fmc.targets.base import Target

# family name → factory(variant or None) → Target
FAMILIES: dict[str, Callable[[str | None], Target]] = {}


def register(name: str):
    def decorator(factory):
        FAMILIES[name] = factory
        return factory
    return decorator


def _load_builtins() -> None:
    import_builtins("fmc.targets", {"base", "registry"})


def get(spec: str) -> Target:
    """Resolve `cpu`, `cuda:sm_80,sm_90`, … to a Target."""
    _load_builtins()
    family, separator, variant = spec.partition(":")
    if family not in FAMILIES:
        raise unknown_choice("target", spec, list(FAMILIES))
    if separator and not variant:
        from fmc.errors import UsageError

        raise UsageError(f"target {spec!r}: nothing after ':' (e.g. cuda:sm_80,sm_90)")
    return FAMILIES[family](variant or None)


def families() -> list[str]:
    _load_builtins()
    return sorted(FAMILIES)
