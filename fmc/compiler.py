"""The compile driver: the phases import → quantize → fuse → lower → codegen → weights →
package, in order, in one list. Each phase reads the products of the phases before it and
returns its own, typed (fmc/products.py); the CompileState holds the options and those
products. IR passes see only a frozen PassContext."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fmc
from fmc.artifacts import abi
from fmc.artifacts.manifest import (
    MANIFEST,
    Collectives,
    FileEntry,
    FusedPart,
    Manifest,
    MemoryEstimate,
    Param,
    Quantization,
    RuntimeSettings,
    Source,
    StoredTensor,
    TargetInfo,
    TensorParallel,
    Weights,
)
from fmc.artifacts.shards import ShardWriter, sha256_file
from fmc.artifacts.staging import StagingDir
from fmc.compile_cache import key_of, open_cache, probe, step_starting_at
from fmc.errors import InputError, UsageError
from fmc.frontend import ModelSource, open_model
from fmc.frontend.calibration import Calibration, calibrate
from fmc.frontend.tensor_parallel import (
    ShardedWeights,
    check_divisible,
    local_config,
    param_sharding,
    shard_importance,
)
from fmc.lowering import param_plan
from fmc.lowering.codegen_failure import codegen_failure
from fmc.lowering.pipeline import (
    IRDumper,
    PassContext,
    load_pass_plugin,
    resolve_disabled,
    run_phase,
)
from fmc.options import CompileOptions
from fmc.products import ConvertedWeights, ImportedModel, Library, ModuleIR, QuantizedModel
from fmc.quant.convert import check_source, convert, plan_params
from fmc.quant.modules import quantize_layers
from fmc.quant.plan import FROM_GGUF, QuantPlan
from fmc.quant.registry import load_plugin
from fmc.quant.stored import StoredParam
from fmc.targets import Target
from fmc.targets import get as get_target

log = logging.getLogger("fmc")

LIBRARY_STEM = "model"
DEFAULT_CONTEXT = 4096
DEFAULT_PAGE_SIZE = 16
DEFAULT_QUANT = "q0f32"  # for inputs that are not GGUF files

Progress = Callable[..., None]


@dataclass
class CompileState:
    """One compile: its resolved inputs, then each phase's product as it is made."""

    options: CompileOptions
    target: Target
    requested_plan: QuantPlan | None  # None: chosen at import (it depends on the input)
    disabled: set[str]
    staging: StagingDir | None  # set by compile_model; None when only the IR is built
    dumper: IRDumper
    imported: ImportedModel | None = None
    quantized: QuantizedModel | None = None
    ir: ModuleIR | None = None  # after the fuse phase, then after the lower phase
    library: Library | None = None  # built, or restored from the build cache
    weights: ConvertedWeights | None = None  # None: a weights-free model reference
    manifest: Manifest | None = None  # written by the package phase
    timings: dict[str, float] = field(default_factory=dict)
    cache: Any = None  # a BuildCache, or None
    cache_status: dict[str, str] = field(default_factory=dict)  # step → "hit" | "miss"

    @property
    def source(self) -> ModelSource:
        return self.imported.source

    @property
    def plan(self) -> QuantPlan | None:
        return self.imported.plan if self.imported is not None else self.requested_plan

    @property
    def compute_dtype(self) -> str:
        return self.imported.compute_dtype

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

    @property
    def params(self) -> tuple[StoredParam, ...]:
        """The stored parameters as far as the compile got: the library's (after horizontal
        fusion), else the IR's, else the exported model's."""
        for product in (self.library, self.ir, self.quantized):
            if product is not None:
                return product.params
        return ()

    @property
    def mod(self):
        """The latest Relax module: after lowering, fusing or exporting (None before)."""
        for product in (self.ir, self.quantized):
            if product is not None:
                return product.mod
        return None

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


def _import(state: CompileState, progress: Progress) -> ImportedModel:
    o = state.options
    source = open_model(o.model, o.weights, o.tokenizer, revision=o.revision,
                        offline=o.offline, progress=progress)
    config = source.config
    source_types = _source_types(source)
    plan = state.requested_plan
    if plan is None:  # the default: a GGUF input keeps its own types
        plan = QuantPlan.parse(FROM_GGUF if source_types else DEFAULT_QUANT, o.quant_overrides)
    plan.bind(config.num_hidden_layers, source_types, source.reference)
    limit = config.context_window
    context_window = min(o.context_window or min(limit, DEFAULT_CONTEXT), limit)
    if o.context_window and o.context_window > limit:
        raise UsageError(f"--context-window {o.context_window} exceeds the model's "
                         f"{limit} positions")
    check_divisible(config, o.tensor_parallel)
    if o.calib and config.num_experts:
        raise UsageError("--calib is not supported for mixture-of-experts models: its "
                         "activation statistics come from a dense llama-style reference")
    if not source.tokenizer:
        log.warning("no tokenizer files found; the artifact will take token ids only")
    return ImportedModel(source, plan, state.target.compute_dtype(plan.compute_dtype),
                         context_window)


def _quantize(state: CompileState, progress: Progress) -> QuantizedModel:
    from fmc.frontend.archs import registry as archs

    model = archs.get(state.config.architecture).model(
        state.local_config, state.compute_dtype, state.target.tvm_target(),
        debug_layers=state.options.debug_layers, tensor_parallel=state.ranks)
    entry_functions = (*abi.ENTRY_FUNCTIONS, abi.DEBUG_ENTRY) if state.options.debug_layers \
        else abi.ENTRY_FUNCTIONS
    expected = {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}
    if state.source.weights is not None:
        extra = check_source(state.rank_weights(0), expected)
        if extra:
            log.warning("ignoring %d checkpoint tensor(s) the model does not use: %s",
                        len(extra), ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))
    try:
        layer_schemes, quantized = quantize_layers(
            model, state.plan, state.compute_dtype, model.output_layers(),
            state.target.row_block)
    except InputError as exc:
        if state.ranks == 1:
            raise
        raise InputError(f"{exc} (in one rank's 1/{state.ranks} slice: --tensor-parallel "
                         f"{state.ranks})") from None
    mod, named = model.export_tvm(spec=model.get_default_spec())
    exported = [(n, tuple(int(d) for d in p.shape), str(p.dtype)) for n, p in named]
    params = tuple(plan_params(exported, quantized))
    mod = param_plan.attach(mod, params)
    state.dumper.dump("quantize", "export", mod)
    return QuantizedModel(mod, params, layer_schemes, expected, entry_functions)


def _attach_metadata(mod, params):
    """Embed the parameter order in the library itself: the .so keeps no names otherwise."""
    import tvm
    from tvm import relax

    metadata = abi.LibraryMetadata(abi.ABI_VERSION,
                                   [[p.name, list(p.shape), p.dtype] for p in params])
    builder = relax.BlockBuilder(mod)
    with builder.function(abi.METADATA_FUNCTION, []):
        builder.emit_func_output(tvm.ir.StringImm(metadata.to_json()))
    return builder.get()


def pass_context(state: CompileState) -> PassContext:
    """The read-only facts the IR passes of this compile are built from."""
    return PassContext(state.target, state.compute_dtype, state.quantized.entry_functions,
                       tuple(state.options.override_kernels))


def _fuse(state: CompileState, progress: Progress) -> ModuleIR:
    mod = run_phase("fuse", state.quantized.mod, pass_context(state), state.disabled,
                    state.dumper)
    # The parameter list is final once the fuse phase is done (horizontal fusion changes
    # it): read back the plan the passes left on the module.
    params = param_plan.read(mod)
    return ModuleIR(param_plan.strip(mod),
                    state.quantized.params if params is None else params)


def _lower(state: CompileState, progress: Progress) -> ModuleIR:
    mod = _attach_metadata(state.ir.mod, state.ir.params)
    mod = run_phase("lower", mod, pass_context(state), state.disabled, state.dumper)
    return ModuleIR(mod, state.ir.params)


def _codegen(state: CompileState, progress: Progress) -> Library:
    from tvm import relax

    target = state.target.tvm_target()
    with state.target.codegen_hooks(), target:
        executable = relax.build(state.ir.mod, target=target, relax_pipeline=None,
                                 **state.target.build_options())
    file = LIBRARY_STEM + state.target.library_suffix
    library = state.staging.path / file
    state.target.export(executable, library)
    return Library(file, state.ir.params, state.quantized.entry_functions,
                   state.target.validate(library, executable))


def _weights(state: CompileState, progress: Progress) -> ConvertedWeights | None:
    """Convert the checkpoint; tensor-parallel: once per rank from that rank's slice of every
    tensor, so quantized weights and their scales are sharded alike by construction."""
    if state.source.weights is None:
        return None
    params = state.library.params
    total = len(params) * state.ranks
    stats: dict[str, int] = {}
    measured = _calibrate(state, progress) if state.options.calib else None
    all_tensors, all_shards = [], []
    done = 0
    for rank in range(state.ranks):
        subdir = f"rank-{rank}" if state.ranks > 1 else None
        writer = ShardWriter(state.staging.path, state.options.shard_bytes, subdir)
        importance = {} if measured is None else {
            name: shard_importance(name, vector, rank, state.ranks)
            for name, vector in measured.importance.items()}
        for name, array in convert(state.rank_weights(rank), list(params),
                                   state.options.allow_nonfinite, stats, importance):
            writer.add(name, array)
            done += 1
            progress("tensor", done=done, total=total, name=name)
        tensors, shards = writer.close()
        if state.ranks > 1:
            tensors = [{**t, "rank": rank} for t in tensors]
            shards = [{**s, "rank": rank} for s in shards]
        all_tensors += tensors
        all_shards += shards
    if stats.get("lossless"):
        log.info("imported %d tensor(s) losslessly from GGUF blocks", stats["lossless"])
    return ConvertedWeights(tuple(all_tensors), tuple(all_shards),
                            None if measured is None else measured.describe())


def _calibrate(state: CompileState, progress: Progress) -> Calibration:
    """Run the float model over the --calib text (whole model, before any sharding)."""
    start = time.perf_counter()
    measured = calibrate(state.config, state.source.weights, state.source.tokenizer,
                         state.options.calib,
                         lambda done, total: progress("calibrate", done=done, total=total))
    log.info("calibration: %d tokens of %s through the float model in %.1f s", measured.tokens,
             state.options.calib, time.perf_counter() - start)
    return measured


def _package(state: CompileState, progress: Progress) -> Manifest:
    tokenizer_dir = state.staging.path / "tokenizer"
    tokenizer_dir.mkdir()
    for name, content in sorted(state.source.tokenizer.items()):
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        (tokenizer_dir / name).write_bytes(data)
    manifest = build_manifest(state)
    (state.staging.path / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def memory_estimate(state: CompileState) -> MemoryEstimate:
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
    window = state.imported.context_window
    kv_per_layer_token = 2 * c.num_key_value_heads * c.head_dim * item
    kv = c.num_hidden_layers * window * kv_per_layer_token
    windowed_kv, windowed = None, c.windowed_layers
    if windowed:  # what the sliding layers would hold if the cache dropped old keys
        attention_window, sliding = windowed
        kept = attention_window - 1 + state.options.prefill_chunk
        if kept < window:
            windowed_kv = kv - len(sliding) * (window - kept) * kv_per_layer_token
    attention = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    # A mixture of experts computes k experts' MLP per token.
    inner = c.intermediate_size * max(1, c.num_experts_per_tok)
    per_token = (5 * c.hidden_size + 3 * inner + 2 * attention) * item
    workspace = state.options.prefill_chunk * per_token + 4 * c.vocab_size
    total = weights + kv + workspace
    sharded = state.ranks > 1
    active = None
    if c.num_experts:  # one token reads its k experts' weights, not all of them
        from fmc.nn_moe import is_expert_param

        experts = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in state.params
                      if is_expert_param(p.source))
        active = weights - experts + experts * c.num_experts_per_tok // c.num_experts
    return MemoryEstimate(weights, kv, workspace, total, window,
                          ranks=state.ranks if sharded else None,
                          all_ranks_bytes=state.ranks * total if sharded else None,
                          active_weights_bytes=active, windowed_kv_cache_bytes=windowed_kv)


def tensor_parallel_summary(state: CompileState) -> TensorParallel:
    """What the manifest says about the ranks: how many, what each one computes, and the
    collectives a forward step issues (one all-reduce after attention, one after the MLP)."""
    return TensorParallel(state.ranks, state.local_config,
                          Collectives(2 * state.config.num_hidden_layers,
                                      "runtime.disco.allreduce"),
                          "params/rank-{rank}")


def _manifest_params(state: CompileState) -> tuple[Param, ...]:
    tensors = state.weights.tensors if state.weights is not None else ()
    stored = {(t["name"], t.get("rank", 0)): StoredTensor.from_dict(t) for t in tensors}
    params = []
    for p in state.params:
        fused = None
        if p.members:  # horizontally fused: rows [start, end) come from each member
            fused, start = [], 0
            for member in p.members:
                fused.append(FusedPart(member.name, member.source, member.part,
                                       (start, start + member.shape[0])))
                start += member.shape[0]
        sharded = state.ranks > 1
        ranks = tuple(stored[(p.name, rank)] for rank in range(state.ranks)) \
            if sharded and (p.name, 0) in stored else None
        params.append(Param(
            p.name, tuple(p.shape), p.dtype, None if fused else p.source, p.scheme,
            stored.get((p.name, 0)), None if fused is None else tuple(fused),
            param_sharding(p, state.quantized.local_shapes, state.ranks) if sharded else None,
            ranks))
    return tuple(params)


def build_manifest(state: CompileState) -> Manifest:
    import tvm

    library = state.library
    library_path = state.staging.path / library.file
    weights = state.weights
    shards = weights.shards if weights is not None else ()
    return Manifest(
        fmc_version=fmc.__version__,
        tvm_version=tvm.__version__,
        source=Source.described(state.source.describe()),
        target=TargetInfo.described(state.target.describe(), library.validation),
        library=FileEntry(library.file, sha256_file(library_path),
                          library_path.stat().st_size),
        quantization=Quantization.described(state.plan.describe(),
                                            state.quantized.layer_schemes,
                                            state.target.row_block,
                                            weights.calibration if weights else None),
        compute_dtype=state.compute_dtype,
        model=state.config,
        runtime=RuntimeSettings(state.imported.context_window, state.options.prefill_chunk,
                                DEFAULT_PAGE_SIZE),
        entry_functions=library.entry_functions,
        weights=Weights(state.source.weights is not None,
                        tuple(FileEntry.from_dict(s) for s in shards),
                        state.options.shard_bytes),
        params=_manifest_params(state),
        tensor_parallel=tensor_parallel_summary(state) if state.ranks > 1 else None,
        tokenizer=tuple(sorted(state.source.tokenizer)),
        memory=memory_estimate(state),
    )


@dataclass(frozen=True)
class Phase:
    name: str
    doc: str
    run: Callable[[CompileState, Progress], Any]  # returns the phase's product
    product: str  # the CompileState field that holds it


PHASES: list[Phase] = [
    Phase("import", "read the config, index the weights, rebuild the tokenizer", _import,
          "imported"),
    Phase("quantize", "pick a scheme per layer, swap in quantized layers, export Relax IR",
          _quantize, "quantized"),
    Phase("fuse", "legalize operators to TIR kernels and fuse them", _fuse, "ir"),
    Phase("lower", "schedule kernels for the target and lower to the Relax VM", _lower, "ir"),
    Phase("codegen", "generate and link the target library", _codegen, "library"),
    Phase("weights", "quantize the weights tensor by tensor into safetensors shards", _weights,
          "weights"),
    Phase("package", "write the tokenizer and manifest, then publish atomically", _package,
          "manifest"),
]


@dataclass
class CompileResult:
    output: Path
    manifest: Manifest
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
        from fmc.frontend.archs import registry as archs
        from fmc.lowering import pipeline
        from fmc.quant import registry

        registry.all_schemes()  # built-ins register once per process: keep them
        families = archs.all_architectures()
        passes, schemes = list(pipeline.PIPELINE), dict(registry.SCHEMES)
        try:
            return function(*args, **kwargs)
        finally:
            pipeline.PIPELINE[:] = passes
            registry.SCHEMES.clear()
            registry.SCHEMES.update(schemes)
            archs.ARCHITECTURES.clear()
            archs.ARCHITECTURES.update(families)

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
    for plugin in options.arch_plugins:
        from fmc.frontend.archs import load_plugin as load_arch_plugin

        load_arch_plugin(plugin)
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
                setattr(state, step.product, step.restore(entry.meta))
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
        try:
            product = phase.run(state, progress)
        except Exception as exc:  # a TVM failure on a valid model: exit 8, not internal
            failure = codegen_failure(state, phase.name, exc)
            if failure is None:
                raise
            raise failure from exc
        setattr(state, phase.product, product)
        state.timings[phase.name] = time.perf_counter() - start
        progress("phase-done", name=phase.name, seconds=state.timings[phase.name])
        if phase.name in to_store:
            step, key, record = to_store.pop(phase.name)
            start = time.perf_counter()
            state.cache.store(step.kind, key, record, step.label(state), step.files(state),
                              getattr(state, step.product).to_dict())
            state.timings["cache"] += time.perf_counter() - start


IR_PHASES = ("import", "quantize", "fuse", "lower")


@plugin_scoped
def build_ir(options: CompileOptions, progress: Progress | None = None) -> CompileState:
    """Run only the IR phases (import → lower) in memory, writing nothing but IR dumps; the
    state's `ir` (`mod`, `params`) is the scheduled, VM-lowered module codegen would build."""
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
             *map(Path, options.arch_plugins),
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
    shards = math.ceil(memory.weights_bytes / options.shard_bytes) if has_weights else 0
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
                  MANIFEST],
        "parameters": len(state.params),
        # weights in the model (a mixture of experts: all of them, and one token's share)
        "parameter_count": {"total": state.config.param_count(),
                            "active": state.config.param_count(active=True)},
        "tensor_parallel": tensor_parallel_summary(state).to_dict() if state.ranks > 1
        else None,
        "memory": {**memory.to_dict(), "weights_bytes_per_scheme": per_scheme},
        "input_files": [str(p) for p in input_files(state)],
        "cache": {"dir": str(cache.root), **probe(state, cache)} if cache else None,
    }
