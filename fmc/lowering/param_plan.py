"""The stored-parameter plan travels on the IRModule, as a module attribute: the quantize
phase attaches it, a pass that changes the parameter list (horizontal fusion) records the
new plan there, and the compiler reads it back after the fuse phase. Passes get no mutable
compile state to write it to."""

from __future__ import annotations

import json

from fmc.quant.stored import StoredParam

ATTR = "fmc.stored_params"


def attach(mod, params) -> object:
    """`mod` with `params` (StoredParams, in the packed parameter tuple's order) as its plan."""
    return mod.with_attr(ATTR, json.dumps([p.to_dict() for p in params]))


def read(mod) -> tuple[StoredParam, ...] | None:
    """The plan `mod` carries; None for a module built outside the compiler."""
    text = mod.get_attr(ATTR)
    if text is None:
        return None
    return tuple(StoredParam.from_dict(p) for p in json.loads(str(text)))


def strip(mod) -> object:
    """`mod` without its plan (once read back: code generation needs no fmc attribute)."""
    return mod.without_attr(ATTR) if mod.get_attr(ATTR) is not None else mod
