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


def import_registering(path: str | Path, kind: str, registry: dict, what: str) -> list[str]:
    """Import plugin file `path` (import_file); returns the names it added to `registry` or
    replaced there. A file that registers nothing is bad input (`what`: what it should have
    registered and how)."""
    before = dict(registry)
    import_file(path, kind)
    added = [name for name, value in registry.items() if before.get(name) is not value]
    if not added:
        raise InputError(f"{path}: registers no {what}")
    return added


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


SCALARS = (int, float, str, bytes, bool, type(None))


def _simple(value) -> bool:
    """Whether repr(value) is a deterministic description of it (no object addresses)."""
    if isinstance(value, (tuple, frozenset)):
        return all(_simple(v) for v in value)
    return isinstance(value, SCALARS)


def code_identity(obj) -> str:
    """A digest of the code behind a registered object (a scheme instance, a pass factory):
    the source file and qualified name of its class or function, and of the classes and
    functions a closure or `functools.partial` captures. Registrations made in-process, not
    from a file, are told apart by this in the build cache's keys."""
    import functools
    import hashlib
    import inspect
    import types

    digest = hashlib.sha256()
    seen: set[int] = set()

    def code(item) -> bool:
        return inspect.isfunction(item) or inspect.isclass(item) or \
            isinstance(item, functools.partial) or inspect.ismethod(item)

    def visit(item) -> None:
        if id(item) in seen:
            return
        seen.add(id(item))
        if _simple(item):
            digest.update(repr(item).encode())
        elif isinstance(item, functools.partial):
            for part in (item.func, *item.args, *item.keywords.values()):
                visit(part)
        elif inspect.ismethod(item):
            visit(item.__func__)
            visit(item.__self__)
        elif isinstance(item, (list, tuple)):
            for element in item:
                visit(element)
        elif inspect.isfunction(item) or inspect.isclass(item):
            source(item)
        elif not (inspect.ismodule(item) or inspect.isbuiltin(item)):
            # an instance: its class, and its settings (q4k and q5k share a class)
            for name, value in sorted(getattr(item, "__dict__", {}).items()):
                if _simple(value) or code(value) or isinstance(value, (list, tuple)):
                    digest.update(name.encode())
                    visit(value)
            visit(type(item))
        else:
            digest.update(getattr(item, "__name__", "?").encode())

    def source(item) -> None:
        """The file that defines `item` (its bytecode without one), then what it captures."""
        digest.update(f"{item.__module__}.{item.__qualname__}".encode())
        try:
            digest.update(Path(inspect.getsourcefile(item)).read_bytes())
        except Exception:  # built in, or defined without a file
            body = getattr(item, "__code__", None)
            digest.update(body.co_code if isinstance(body, types.CodeType) else b"?")
        if inspect.isfunction(item):
            for cell in item.__closure__ or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if _simple(contents) or code(contents):
                    visit(contents)
        else:
            for base in item.__mro__[1:]:
                if base.__module__ not in ("builtins", "abc"):
                    visit(base)

    visit(obj)
    return digest.hexdigest()[:16]
