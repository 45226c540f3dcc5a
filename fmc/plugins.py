"""Import a user's plugin file (a quantization scheme, a pass) as a module, reporting any
failure as bad input that names the file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from fmc.errors import FmcError, InputError


def import_file(path: str | Path, kind: str) -> ModuleType:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {kind} file not found")
    name = f"fmc_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except FmcError:
        raise
    except Exception as exc:  # plugin code is the user's: any failure is bad input
        raise InputError(f"{path}: {kind} failed to load: {type(exc).__name__}: {exc}") \
            from exc
    return module


def import_builtins(package_name: str, infrastructure: set[str]) -> None:
    """Import every module of a plugin package except its infrastructure modules, so each
    built-in plugin file registers itself (a new plugin is one new file). Imports are cached
    by Python, so calling this again is cheap."""
    import importlib
    import pkgutil

    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in infrastructure:
            importlib.import_module(f"{package_name}.{info.name}")
