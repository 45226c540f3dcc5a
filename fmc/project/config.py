"""fmc.toml: named builds, defaults and matrices, checked key by key (errors name the key
and its line)."""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmc.errors import InputError
from fmc.options import toml_keys, value_kinds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the pinned Python is 3.11
    import tomli as tomllib

# Build keys → expected Python type (a tuple: any of them): every CompileOptions field that
# fmc.toml may set (fmc/options.py), under its fmc.toml name.
BUILD_KEYS: dict[str, tuple[type, ...]] = {
    key: value_kinds(item, meta) for key, (item, meta) in toml_keys().items()}
DEFAULT_KEYS = {**{k: v for k, v in BUILD_KEYS.items() if k != "output"},
                "output_dir": (str,)}
MATRIX_KEYS = {**{k: v for k, v in BUILD_KEYS.items() if k not in ("output", "quant",
                                                                     "target")},
               "quants": (list,), "targets": (list,)}
NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
TYPE_NAMES = {str: "string", int: "positive integer", list: "list of strings",
              bool: "boolean (true or false)"}


@dataclass
class Build:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.settings["output"])


def _line_of(text: str, section: str, key: str | None) -> int:
    """1-based line of `key` inside `[section]` (or of the section header), for messages."""
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[\s*{re.escape(section)}\s*\]")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return 1
    if key is None:
        return start + 1
    pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if pattern.match(lines[i]):
            return i + 1
    return start + 1


def _line_of_top_level(text: str, key: str) -> int:
    """1-based line of `[[key]]` or `key = …` (a top-level entry of the wrong kind)."""
    pattern = re.compile(rf"^\s*(\[\[\s*{re.escape(key)}\s*\]\]|\"?{re.escape(key)}\"?\s*=)")
    return next((i + 1 for i, line in enumerate(text.splitlines()) if pattern.match(line)), 1)


def _check(path: Path, text: str, section: str, table: Any, allowed: dict) -> dict:
    if not isinstance(table, dict):
        raise InputError(f"{path}:{_line_of(text, section, None)}: [{section}] must be a table")
    for key, value in table.items():
        line = _line_of(text, section, key)
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(f"{path}:{line}: unknown key {key!r} in [{section}] ({hint}"
                             f"allowed: {', '.join(sorted(allowed))})")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) != (bool in
                                                                          allowed[key]):
            kinds = " or ".join(TYPE_NAMES[t] for t in allowed[key])
            raise InputError(f"{path}:{line}: {section}.{key} must be a {kinds}, got "
                             f"{type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
            raise InputError(f"{path}:{line}: {section}.{key} must be a list of non-empty "
                             "strings")
        if isinstance(value, str) and not value.strip():
            raise InputError(f"{path}:{line}: {section}.{key} must not be empty")
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise InputError(f"{path}:{line}: {section}.{key} must be positive, got {value}")
    return dict(table)


def load(path: Path | str) -> list[Build]:
    """The builds of an fmc.toml, in file order (a matrix expands to NAME-QUANT-TARGET)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (fmc build reads ./fmc.toml or --config)") \
            from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: {exc}") from None
    for key in data:
        if key not in ("defaults", "build", "matrix"):
            raise InputError(f"{path}:{_line_of(text, key, None)}: unknown table [{key}] "
                             "(allowed: [defaults], [build.NAME], [matrix.NAME])")
    defaults = _check(path, text, "defaults", data.get("defaults", {}), DEFAULT_KEYS)
    output_dir = Path(defaults.pop("output_dir", "build"))
    builds: list[Build] = []
    for kind in ("build", "matrix"):
        tables = data.get(kind, {})
        if not isinstance(tables, dict):
            form = "an array of tables" if isinstance(tables, list) else "a value"
            raise InputError(f"{path}:{_line_of_top_level(text, kind)}: {kind} is {form}; "
                             f"write one table per build: [{kind}.NAME]")
        for name, table in tables.items():
            section = f"{kind}.{name}"
            if not NAME.fullmatch(name):
                raise InputError(f"{path}:{_line_of(text, section, None)}: build name "
                                 f"{name!r} (letters, digits, '.', '_', '-')")
            settings = {**defaults, **_check(path, text, section, table,
                                             BUILD_KEYS if kind == "build" else MATRIX_KEYS)}
            if kind == "build":
                settings.setdefault("output", str(output_dir / name))
                builds.append(Build(name, settings))
                continue
            quants = settings.pop("quants", [settings.get("quant")])
            targets = settings.pop("targets", [settings.get("target", "cpu")])
            for quant in quants:
                for target in targets:
                    full = f"{name}-{quant or 'auto'}-{target.replace(':', '_')}"
                    builds.append(Build(full, {**settings, "quant": quant, "target": target,
                                               "output": str(output_dir / full)}))
    seen: set[str] = set()
    for build in builds:
        if build.name in seen:
            raise InputError(f"{path}: build {build.name!r} is defined twice")
        seen.add(build.name)
    if not builds:
        raise InputError(f"{path}: defines no builds ([build.NAME] or [matrix.NAME])")
    return builds
