"""What `compile` takes from the build cache, and under which keys.

Two steps are cached separately, so that changing only the target reuses the converted
weights and changing only the weights reuses the library:

- **library** (the fuse, lower and codegen phases): keyed by fmc's code, TVM's version, the
  target (its TVM target, variant and every host tool's version), the architecture config,
  compute dtype, quantization plan and per-layer schemes, the parameter list, the passes
  run, the content of every plugin and kernel-override file, and the code identity
  (fmc.plugins.code_identity) of every pipeline pass and every scheme used — so a pass or
  scheme registered in-process, from no file, changes the key as well. Weights and tokenizer are
  not part of it: the library does not depend on them.
- **weights** (the weights phase): keyed by fmc's code, TVM's and numpy's versions, the
  content of the weight and config files, the stored parameters (after horizontal fusion:
  names, shapes, dtypes, schemes, sources), the quantization plugin files, the code identity
  of the schemes used, and the options that change the shards.

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
from fmc.quant.convert import StoredParam

if TYPE_CHECKING:
    from fmc.compiler import CompileOptions, CompileState

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


def _digest(cache: BuildCache, path: Path | str) -> str:
    try:
        return cache.file_digest(Path(path))
    except OSError:
        return "unreadable"  # the phase that reads it reports the error


def param_to_dict(param: StoredParam) -> dict[str, Any]:
    return dataclasses.asdict(param)


def param_from_dict(data: dict[str, Any]) -> StoredParam:
    return StoredParam(**{**data, "shape": tuple(data["shape"]),
                          "members": tuple(param_from_dict(m) for m in data["members"])})


def _pass_identities() -> list[list[str]]:
    """The code of every pass in the pipeline: a pass registered in-process (no plugin file)
    changes the library key too."""
    from fmc.lowering.pipeline import PIPELINE
    from fmc.plugins import code_identity

    return [[spec.name, spec.phase, code_identity(spec.make)] for spec in PIPELINE]


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
            "quantization": state.plan.describe(), "layers": state.layer_schemes,
            "params": [param_to_dict(p) for p in state.params],
            "disabled_passes": sorted(state.disabled), "debug_layers": o.debug_layers,
            "quant_plugins": [_digest(cache, f) for f in o.quant_plugins],
            "pass_plugins": [_digest(cache, f) for f in o.pass_plugins],
            "registrations": {"passes": _pass_identities(),
                              "schemes": _scheme_identities(state)},
            "override_kernels": overrides}


def _library_files(state: CompileState) -> dict[str, Path]:
    return {state.library: state.staging.path / state.library}


def _library_meta(state: CompileState) -> dict[str, Any]:
    return {"library": state.library, "validation": state.validation,
            "params": [param_to_dict(p) for p in state.params],
            "entry_functions": list(state.entry_functions)}


def _library_restore(state: CompileState, meta: dict[str, Any]) -> None:
    state.library = meta["library"]
    state.validation = meta["validation"]
    state.params = [param_from_dict(p) for p in meta["params"]]
    state.entry_functions = tuple(meta["entry_functions"])


# -- weights ------------------------------------------------------------------------------
def _weights_record(state: CompileState, cache: BuildCache) -> dict[str, Any]:
    import numpy as np
    import tvm

    tokenizer_files = {Path(p) for p in state.source.tokenizer.values() if isinstance(p, Path)}
    inputs = sorted([Path(f).name, _digest(cache, f)] for f in state.source.input_files
                    if Path(f) not in tokenizer_files)
    return {"step": "weights", "fmc": fmc_fingerprint(), "tvm": tvm.__version__,
            "numpy": np.__version__,
            "inputs": inputs, "params": [param_to_dict(p) for p in state.params],
            # a plugin scheme's quantizer runs here
            "quant_plugins": [_digest(cache, f) for f in state.options.quant_plugins],
            "schemes": _scheme_identities(state),
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
    return {shard["file"]: state.staging.path / shard["file"] for shard in state.shards}


def _weights_meta(state: CompileState) -> dict[str, Any]:
    return {"tensors": state.tensors, "shards": state.shards, "calibration": state.calibration}


def _weights_restore(state: CompileState, meta: dict[str, Any]) -> None:
    state.tensors, state.shards = meta["tensors"], meta["shards"]
    state.calibration = meta.get("calibration")


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
    record: Callable[[CompileState, BuildCache], dict[str, Any]]
    files: Callable[[CompileState], dict[str, Path]]
    meta: Callable[[CompileState], dict[str, Any]]
    label: Callable[[CompileState], str]  # what `fmc cache ls` shows
    restore: Callable[[CompileState, dict[str, Any]], None]
    applies: Callable[[CompileState], bool] = lambda state: True
    # False: still store the result, but run the phases (e.g. the user asked for IR dumps).
    may_skip: Callable[[CompileState], bool] = lambda state: True


STEPS = (
    CachedStep("library", ("fuse", "lower", "codegen"), _library_record, _library_files,
               _library_meta, _library_label, _library_restore,
               may_skip=lambda state: state.options.dump_ir is None),
    CachedStep("weights", ("weights",), _weights_record, _weights_files, _weights_meta,
               _weights_label, _weights_restore,
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
        fused = dataclasses.replace(state, params=[param_from_dict(p)
                                                   for p in entry.meta["params"]])
        key, _ = key_of(weights, fused, cache)
        status["weights"] = "hit" if cache.lookup("weights", key) else "miss"
    return status
