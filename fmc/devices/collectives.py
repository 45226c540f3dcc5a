"""Which collective libraries the installed TVM build gives Disco, read from its runtime
libraries' registration names instead of by loading them: `fmc doctor` answers without the
seconds that importing TVM costs. fmc's own CPU collectives are always there."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

CCLS = ("nccl", "rccl")


def registered_name(ccl: str) -> str:
    """The global function a TVM build with that library registers."""
    return f"runtime.disco.{ccl}.init_ccl"


def registered_in_tvm_build(names: Iterable[str]) -> set[str]:
    """Those of `names` that the installed TVM's runtime libraries register (each name is
    a NUL-terminated string in the library that registers it)."""
    spec = importlib.util.find_spec("tvm")
    roots = spec.submodule_search_locations if spec is not None else None
    wanted = {name: name.encode() + b"\0" for name in names}
    found = set()
    libraries = [path for root in roots or () for path in Path(root).glob("lib*/libtvm_runtime*")]
    for library in libraries:
        data = library.read_bytes()
        found |= {name for name, marker in wanted.items() if marker in data}
    return found


def collectives_in_tvm_build() -> dict[str, bool]:
    found = registered_in_tvm_build(registered_name(ccl) for ccl in CCLS)
    return {ccl: registered_name(ccl) in found for ccl in CCLS} | {"fmc-cpu": True}
