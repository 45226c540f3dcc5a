"""Replace named TIR kernels with PrimFuncs from users' files (after scheduling)."""

from __future__ import annotations

import re
from pathlib import Path

import tvm
from tvm import tirx

from fmc.errors import InputError, UsageError, raise_in_pass
from fmc.plugins import import_file


def signature(func: tirx.PrimFunc) -> list[str]:
    """Each parameter as `dtype[shape]` (buffers) or `dtype` (scalars), in order."""
    parts = []
    for param in func.params:
        ty = param.ty
        if hasattr(ty, "shape"):
            dims = ", ".join(str(d.value) if isinstance(d, tirx.IntImm) else str(d)
                             for d in ty.shape)
            parts.append(f"{ty.dtype}[{dims}]")
        else:
            parts.append(str(getattr(ty, "dtype", ty)))
    return parts


def load_kernel(path: Path) -> tirx.PrimFunc:
    """The file's `kernel` PrimFunc, or its only module-level PrimFunc."""
    module = import_file(path, "kernel override")
    if isinstance(getattr(module, "kernel", None), tirx.PrimFunc):
        return module.kernel
    found = [v for v in vars(module).values() if isinstance(v, tirx.PrimFunc)]
    if len(found) != 1:
        raise InputError(f"{path}: define exactly one PrimFunc (or name one `kernel`), "
                         f"found {len(found)}")
    return found[0]


def parse_override(text: str) -> tuple[str | None, str, Path]:
    """`[ENTRY/]KERNEL=FILE` → (entry or None, kernel, file)."""
    target, sep, file = text.partition("=")
    if not sep or not target or not file:
        raise UsageError(f"--override-kernel {text!r}: expected [ENTRY/]KERNEL=FILE")
    entry, _, kernel = target.rpartition("/")
    return entry or None, kernel, Path(file)


@tvm.transform.module_pass(opt_level=0, name="OverrideKernels")
class OverrideKernels:
    """For each `[ENTRY/]KERNEL=FILE`: check that KERNEL exists (and is called by ENTRY),
    that the file's PrimFunc has the same parameter dtypes and shapes, then swap it in."""

    def __init__(self, overrides: list[str]):
        self.overrides = [parse_override(text) for text in overrides]

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels = {gv.name_hint: gv for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc)}
        for entry, name, path in self.overrides:
            if name not in kernels:
                from fmc.errors import unknown_choice

                raise_in_pass(unknown_choice("kernel", name, list(kernels)))
            if entry is not None:
                if entry not in [gv.name_hint for gv in mod.get_global_vars()]:
                    raise_in_pass(UsageError(f"--override-kernel: no entry function {entry!r}"))
                if not re.search(rf"\b{re.escape(name)}\b", mod[entry].script()):
                    raise_in_pass(UsageError(f"--override-kernel: {entry!r} does not call "
                                             f"{name!r}"))
            original = mod[kernels[name]]
            try:
                replacement = load_kernel(path)
            except InputError as error:
                raise_in_pass(error)
            expected, got = signature(original), signature(replacement)
            if expected != got:
                raise_in_pass(InputError(f"{path}: kernel signature ({', '.join(got)}) does not "
                                         f"match {name} ({', '.join(expected)})"))
            attrs = dict(original.attrs) if original.attrs else {}
            mod[kernels[name]] = replacement.with_attrs(attrs) if attrs else replacement
        return mod
