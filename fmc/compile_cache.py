"""What `compile` takes from the build cache, and under which keys.

Two steps are cached separately, so that changing only the target reuses the converted
weights and changing only the weights reuses the library:

- **library** (the fuse, lower and codegen phases): keyed by fmc's code, TVM's version, the
  target (its TVM target, variant and every host tool's version), the architecture config,
  compute dtype, quantization plan and per-layer schemes, the parameter list, the passes
  run, the content of every plugin and kernel-override file, and the code identity
  (fmc.plugins.code_identity) of every pipeline pass, every scheme used and the model's
  architecture (fmc/frontend/archs/) — so a pass or
  scheme registered in-process, from no file, changes the key as well. Weights and tokenizer are
  not part of it: the library does not depend on them.
- **weights** (the weights phase): keyed by fmc's code, TVM's and numpy's versions, the
  content of the weight and config files, the stored parameters (after horizontal fusion:
  names, shapes, dtypes, schemes, sources), the quantization and architecture plugin files,
  the code identity of the schemes used and of the architecture, and the options that change
  the shards.

Registrations are covered; other in-process changes are not: code that monkeypatches fmc's
functions should pass `use_cache=False`."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmc.artifacts.cache import BuildCache, record_key
from fmc.paths import cache_dir
from fmc.products import ConvertedWeights, Library

if TYPE_CHECKING:
    from fmc.compiler import CompileState
    from fmc.options import CompileOptions

NO_CACHE_ENV = "FMC_NO_CACHE"


@functools.cache
def fmc_fingerprint() -> str:
    """fmc's version and a hash of every file of the installed package: a development
    checkout that changed without a version bump is a different compiler."""
    import fmc

    root = Path(fmc.__file__).parent
    digest = hashlib.sha256(fmc.__version__.encode())
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes())
    return f"{fmc.__version__}+{digest.hexdigest()[:16]}"


def open_cache(options: CompileOptions) -> BuildCache | None:
    """The cache a compile uses: none with `use_cache=False`; `cache_dir` if given; else
    none when FMC_NO_CACHE is set (to anything but 0), else the user's cache directory."""
    if options.use_cache is False:
        return None
    if options.cache_dir is not None:
        return BuildCache(options.cache_dir)
    if options.use_cache is None and os.environ.get(NO_CACHE_ENV, "0") not in ("", "0"):
        return None
    return BuildCache(cache_dir())


def _digest(cache: BuildCache | None, path: Path | str) -> str:
    try:
        if cache is not None:
            return cache.file_digest(Path(path))
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"  # the phase that reads it reports the error


# Options that change nothing in the artifact.
NOT_IN_KEY = ("output", "force", "dump_ir", "use_cache", "cache_dir")


def options_key(options: CompileOptions, files: list[Path], cache: BuildCache | None,
                commit: str | None = None) -> str:
    """The key of a whole compile as far as it is known before any phase runs (what `fmc
    build`'s up-to-date stamp holds): fmc's code fingerprint and TVM's version, as in the
    step keys, every option that shapes the artifact, and the content of `files` (the
    model's) and of every file an option names (recipe, calibration text, plugins, kernel
    overrides), and a hub model's commit. Reading TVM's version from the package metadata
    imports no TVM."""
    from importlib.metadata import version

    from fmc.options import described

    paths = {Path(f) for f in files}
    values = {}
    for item, meta in described():
        value = getattr(options, item.name)
        if item.name in NOT_IN_KEY:
            continue
        values[item.name] = value
        if meta.path:
            for text in value if isinstance(value, list) else [value]:
                if text and item.name == "override_kernels":
                    text = str(text).rpartition("=")[2]
                if text and Path(text).is_file():
                    paths.add(Path(text))
    inputs = sorted([str(p.resolve()), _digest(cache, p)] for p in paths)
    return record_key({"step": "compile", "fmc": fmc_fingerprint(),
                       "tvm": version("apache-tvm"), "options": values, "inputs": inputs,
                       "commit": commit})


def _pass_identities() -> list[list[str]]:
    """The code of every pass in the pipeline: a pass registered in-process (no plugin file)
    changes the library key too."""
    from fmc.lowering.pipeline import PIPELINE
    from fmc.plugins import code_identity

    return [[spec.name, spec.phase, code_identity(spec.make)] for spec in PIPELINE]


def _architecture_identity(state: CompileState) -> list[str]:
    """The family's name and code: an architecture registered in-process (no plugin file)
    changes both keys too (its weight-name mapping decides what the weights phase reads)."""
    from fmc.frontend.archs import registry
    from fmc.plugins import code_identity

    arch = registry.get(state.config.architecture)
    return [arch.name, code_identity(arch)]


def _scheme_identities(state: CompileState) -> dict[str, str]:
    """The code of every scheme the parameters use (under the registered name behind a
    layout's: q4f16_rows16 → q4f16); an in-process registration changes both keys."""
    from fmc.plugins import code_identity
    from fmc.quant import get
    from fmc.quant.registry import split_name

    schemes = sorted({split_name(p.scheme)[0] for p in state.params if p.scheme is not None})
    return {name: code_identity(get(name)) for name in schemes}


# -- library ------------------------------------------------------------------------------
def _library_record(state: CompileState, cache: BuildCache) -> dict[str, Any]:
    import tvm

    from fmc.lowering.passes.override_kernels import parse_override

    o = state.options
    overrides = []
    for text in o.override_kernels:
        entry, kernel, file = parse_override(text)
        overrides.append([entry, kernel, _digest(cache, file)])
    return {"step": "library", "fmc": fmc_fingerprint(), "tvm": tvm.__version__,
            "target": state.target.describe(), "row_block": state.target.row_block,
            "compute_dtype": state.compute_dtype, "model": state.config.to_dict(),
            "tensor_parallel": state.ranks,
            "quantization": state.plan.describe(), "layers": state.quantized.layer_schemes,
            "params": [p.to_dict() for p in state.quantized.params],
            "disabled_passes": sorted(state.disabled), "debug_layers": o.debug_layers,
            "quant_plugins": [_digest(cache, f) for f in o.quant_plugins],
            "pass_plugins": [_digest(cache, f) for f in o.pass_plugins],
            "arch_plugins": [_digest(cache, f) for f in o.arch_plugins],
            "registrations": {"passes": _pass_identities(),
                              "schemes": _scheme_identities(state),
                              "architecture": _architecture_identity(state)},
            "override_kernels": overrides}


def _library_files(state: CompileState) -> dict[str, Path]:
    return {state.library.file: state.staging.path / state.library.file}


# -- weights ------------------------------------------------------------------------------
def _weights_record(state: CompileState, cache: BuildCache) -> dict[str, Any]:
    import numpy as np
    import tvm

    tokenizer_files = {Path(p) for p in state.source.tokenizer.values() if isinstance(p, Path)}
    inputs = sorted([Path(f).name, _digest(cache, f)] for f in state.source.input_files
                    if Path(f) not in tokenizer_files)
    return {"step": "weights", "fmc": fmc_fingerprint(), "tvm": tvm.__version__,
            "numpy": np.__version__,
            "inputs": inputs, "params": [p.to_dict() for p in state.library.params],
            # a plugin scheme's quantizer runs here
            "quant_plugins": [_digest(cache, f) for f in state.options.quant_plugins],
            "schemes": _scheme_identities(state),
            "arch_plugins": [_digest(cache, f) for f in state.options.arch_plugins],
            "architecture": _architecture_identity(state),
            "allow_nonfinite": state.options.allow_nonfinite,
            "tensor_parallel": state.ranks,
            "shard_bytes": state.options.shard_bytes,
            # --calib: the text and the tokenizer that cuts it decide the statistics
            "calibration": [_digest(cache, state.options.calib),
                            sorted([name, _digest(cache, p) if isinstance(p, Path) else
                                    hashlib.sha256(p).hexdigest()]
                                   for name, p in state.source.tokenizer.items())]
            if state.options.calib else None}


def _weights_files(state: CompileState) -> dict[str, Path]:
    return {shard["file"]: state.staging.path / shard["file"] for shard in state.weights.shards}


def _model_name(state: CompileState) -> str:
    return Path(state.source.reference).name or state.source.reference


def _library_label(state: CompileState) -> str:
    return f"{_model_name(state)} {state.plan.describe()['default']} for " \
           f"{state.target.spec or state.target.name}"


def _weights_label(state: CompileState) -> str:
    block = state.target.row_block
    layout = f", rows interleaved by {block}" if block else ""
    return f"{_model_name(state)} {state.plan.describe()['default']}{layout}"


@dataclass(frozen=True)
class CachedStep:
    kind: str
    phases: tuple[str, ...]  # the phases a hit skips, in order
    product: str  # the CompileState field of the step's product (stored, restored whole)
    restore: Callable[[dict[str, Any]], Any]  # the product from its `to_dict()`
    record: Callable[[CompileState, BuildCache], dict[str, Any]]
    files: Callable[[CompileState], dict[str, Path]]
    label: Callable[[CompileState], str]  # what `fmc cache ls` shows
    applies: Callable[[CompileState], bool] = lambda state: True
    # False: still store the result, but run the phases (e.g. the user asked for IR dumps).
    may_skip: Callable[[CompileState], bool] = lambda state: True


STEPS = (
    CachedStep("library", ("fuse", "lower", "codegen"), "library", Library.from_dict,
               _library_record, _library_files, _library_label,
               may_skip=lambda state: state.options.dump_ir is None),
    CachedStep("weights", ("weights",), "weights", ConvertedWeights.from_dict,
               _weights_record, _weights_files, _weights_label,
               applies=lambda state: state.source.weights is not None),
)


def step_starting_at(phase: str) -> CachedStep | None:
    return next((step for step in STEPS if step.phases[0] == phase), None)


def key_of(step: CachedStep, state: CompileState, cache: BuildCache) -> tuple[str, dict]:
    record = step.record(state, cache)
    return record_key(record), record


def probe(state: CompileState, cache: BuildCache) -> dict[str, str]:
    """Would a compile from this state (after import and quantize) hit the cache? For
    `--dry-run`; weights are known only after a library hit (their key needs the parameter
    list that horizontal fusion makes)."""
    library, weights = STEPS
    key, _ = key_of(library, state, cache)
    entry = cache.lookup("library", key)
    status = {"library": "hit" if entry else "miss"}
    if not weights.applies(state):
        status["weights"] = "none"
    elif entry is None:
        status["weights"] = "unknown"
    else:
        built = dataclasses.replace(state, library=Library.from_dict(entry.meta))
        key, _ = key_of(weights, built, cache)
        status["weights"] = "hit" if cache.lookup("weights", key) else "miss"
    return status
