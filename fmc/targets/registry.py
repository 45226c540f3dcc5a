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
    target = FAMILIES[family](variant or None)
    target.spec = spec  # what the user asked for; the manifest records it for the runtime
    return target


def families() -> list[str]:
    _load_builtins()
    return sorted(FAMILIES)


# TVM target kinds → the fmc target family that builds and packages them.
KIND_FAMILIES = {"llvm": "cpu", "cuda": "cuda", "metal": "metal"}


def from_json(text: str) -> Target:
    """A raw TVM target (`--target-json`): the family of its kind packages the library, but
    kernels are compiled for exactly this target (keys TVM does not know are rejected)."""
    import json

    from fmc.errors import UsageError

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--target-json: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict) or "kind" not in raw:
        raise UsageError('--target-json: expected an object with a "kind", e.g. '
                         '{"kind": "llvm", "mcpu": "skylake-avx512"}')
    family = KIND_FAMILIES.get(raw["kind"])
    if family is None:
        raise unknown_choice("target kind", str(raw["kind"]), list(KIND_FAMILIES))
    import tvm

    try:
        tvm_target = tvm.target.Target(raw)
    except Exception as exc:  # TVM reports unknown keys and bad values in its own types
        raise UsageError(f"--target-json: TVM rejects it: {str(exc).splitlines()[-1]}") from None
    target = get(family)
    target.exact_tvm_target = tvm_target  # the expert's target, verbatim
    target.spec = family
    return target
