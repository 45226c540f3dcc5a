"""Run an fmc.toml's builds: compile each one whose inputs or settings changed.

A build is up to date when its artifact exists and its stamp (`OUTPUT.fmc-stamp`, beside
the artifact) holds the same key: the build cache's key of the whole compile as far as it
is known before compiling (`fmc.compile_cache.options_key`: fmc's code fingerprint, TVM's
version, the options, and the content of every input file — a touched but unchanged file
is still up to date). `OUTPUT.fmc-lock` makes builds of one output in several processes
take turns. The stamp lives outside the artifact so artifacts stay byte-reproducible."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fmc.artifacts.lock import file_lock
from fmc.artifacts.manifest import MANIFEST
from fmc.errors import OutputError
from fmc.options import CompileOptions, toml_keys
from fmc.project.config import Build


def _resolved(value: str, base: Path, kernel: bool = False) -> str:
    """`value` relative to `base` when it names a file there (a model that is not a path
    there stays as written: a preset or hub id); "[ENTRY/]KERNEL=FILE": its FILE."""
    if kernel:
        name, separator, file = value.rpartition("=")
        return f"{name}{separator}{_resolved(file, base)}" if separator else value
    return str((base / value).resolve()) if (base / value).exists() else value


def resolve(build: Build, base: Path) -> dict[str, Any]:
    """Settings with paths relative to the fmc.toml's directory made absolute."""
    settings = dict(build.settings)
    for key, (item, meta) in toml_keys().items():
        if meta.path and key in settings:
            kernel = item.name == "override_kernels"
            value = settings[key]
            settings[key] = [_resolved(v, base, kernel) for v in value] \
                if isinstance(value, list) else _resolved(value, base, kernel)
    settings["output"] = str((base / settings["output"]).resolve())
    return settings


def compile_options(settings: dict[str, Any], cache: dict[str, Any] | None = None
                    ) -> CompileOptions:
    """The CompileOptions of a build: its settings, every other field at its default."""
    values = {}
    for key, (item, meta) in toml_keys().items():
        if key in settings:
            value = settings[key]
            values[item.name] = meta.parse(str(value)) if meta.parse is not None else \
                list(value) if isinstance(value, list) else value
    return CompileOptions(**values, force=True, **(cache or {}))


def stamp_key(settings: dict[str, Any], cache: dict[str, Any] | None = None) -> str:
    """The up-to-date check: the compile cache's key of this build before compiling.
    Computed without importing TVM, so a no-op build answers at once."""
    from fmc.compile_cache import open_cache, options_key
    from fmc.frontend.source import open_model

    options = compile_options(settings, cache)
    source = open_model(options.model, options.weights, options.tokenizer,
                        revision=options.revision, offline=options.offline)
    files = [*source.input_files,
             *(p for p in source.tokenizer.values() if isinstance(p, Path))]
    # a hub model: the commit its revision resolves to now (a moved branch is out of date)
    return options_key(options, files, open_cache(options), source.commit)


def stamp_path(output: Path) -> Path:
    return output.with_name(output.name + ".fmc-stamp")


def _write_stamp(path: Path, key: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temp.write_text(key + "\n", encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the build stamp ({exc.strerror})") from None


def run_build(build: Build, base: Path, rebuild: bool = False, progress=None,
              cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile `build` unless up to date; {"name", "status", "output", "seconds", "cache"}.
    `cache`: CompileOptions' use_cache / cache_dir."""
    settings = resolve(build, base)
    output = Path(settings["output"])
    key = stamp_key(settings, cache)
    stamp = stamp_path(output)
    start = time.perf_counter()
    cached: dict[str, str] = {}
    # Another `fmc build` of the same output waits here, then finds it up to date.
    with file_lock(output.with_name(output.name + ".fmc-lock")):
        current = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
        if not rebuild and current == key and (output / MANIFEST).is_file():
            status = "up-to-date"
        else:
            from fmc.compiler import compile_model  # TVM: only when there is work to do

            cached = compile_model(compile_options(settings, cache), progress).cache
            _write_stamp(stamp, key)
            status = "built"
    return {"name": build.name, "status": status, "output": str(output),
            "seconds": time.perf_counter() - start, "cache": cached}
