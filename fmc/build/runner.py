"""Run an fmc.toml's builds: compile each one whose inputs or settings changed.

A build is up to date when its artifact exists and its stamp (`OUTPUT.fmc-stamp`, beside
the artifact) holds the same key: a hash of the build's settings, fmc's and TVM's versions,
and every input file's path, size and modification time; `OUTPUT.fmc-lock` makes builds of
one output in several processes take turns. The stamp lives outside the
artifact so artifacts stay byte-reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from fmc.artifacts.lock import file_lock
from fmc.build.config import Build
from fmc.errors import OutputError

PATH_KEYS = ("model", "weights", "tokenizer", "quant_recipe", "calib")


def resolve(build: Build, base: Path) -> dict[str, Any]:
    """Settings with paths relative to the fmc.toml's directory made absolute (a model that
    is not a path there stays as written: a preset or hub id)."""
    settings = dict(build.settings)
    for key in PATH_KEYS:
        if key in settings and (base / settings[key]).exists():
            settings[key] = str((base / settings[key]).resolve())
    settings["output"] = str((base / settings["output"]).resolve())
    return settings


def compile_options(settings: dict[str, Any], cache: dict[str, Any] | None = None):
    from fmc.cli.output import parse_size
    from fmc.compiler import CompileOptions

    shard = settings.get("shard_size")
    extra = {"shard_bytes": parse_size(str(shard))} if shard is not None else {}
    return CompileOptions(
        model=settings.get("model"), output=settings["output"],
        target=settings.get("target", "cpu"), quant=settings.get("quant"),
        quant_recipe=settings.get("quant_recipe"), calib=settings.get("calib"),
        quant_overrides=list(settings.get("quant_overrides", [])),
        weights=settings.get("weights"), tokenizer=settings.get("tokenizer"), force=True,
        context_window=settings.get("context_window"),
        prefill_chunk=settings.get("prefill_chunk", 512),
        disable_passes=list(settings.get("disable_passes", [])),
        enable_passes=list(settings.get("enable_passes", [])),
        tensor_parallel=settings.get("tensor_parallel", 1), **extra, **(cache or {}))


def stamp_key(settings: dict[str, Any]) -> str:
    """The up-to-date check: settings, versions and the inputs' sizes and mtimes. Computed
    without importing TVM (its version comes from the package metadata), so a no-op build
    answers at once."""
    from importlib.metadata import version

    import fmc
    from fmc.frontend.source import open_model

    source = open_model(settings.get("model"), settings.get("weights"),
                        settings.get("tokenizer"))
    extra = [Path(settings[key]) for key in ("quant_recipe", "calib")
             if settings.get(key) and Path(settings[key]).exists()]
    files = sorted({Path(p).resolve() for p in [
        *source.input_files, *(p for p in source.tokenizer.values() if isinstance(p, Path)),
        *extra]})
    inputs = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    record = {"settings": settings, "fmc": fmc.__version__, "tvm": version("apache-tvm"),
              "inputs": inputs}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


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
    key = stamp_key(settings)
    stamp = stamp_path(output)
    start = time.perf_counter()
    cached: dict[str, str] = {}
    # Another `fmc build` of the same output waits here, then finds it up to date.
    with file_lock(output.with_name(output.name + ".fmc-lock")):
        current = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
        if not rebuild and current == key and (output / "manifest.json").is_file():
            status = "up-to-date"
        else:
            from fmc.compiler import compile_model  # TVM: only when there is work to do

            cached = compile_model(compile_options(settings, cache), progress).cache
            _write_stamp(stamp, key)
            status = "built"
    return {"name": build.name, "status": status, "output": str(output),
            "seconds": time.perf_counter() - start, "cache": cached}
