"""The contract a compilation target implements; the pipeline asks it and never tests kinds."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fmc.errors import MissingToolchainError, UsageError


@dataclass(frozen=True)
class Tool:
    """A host program a target needs to build or validate its library."""

    name: str  # executable searched on PATH
    purpose: str
    install_hint: str  # e.g. "apt-get install lld"
    version_args: tuple[str, ...] = ("--version",)
    # The line of the version output that identifies the release (default: the first).
    version_pattern: str | None = None
    # Other executable names for the same tool (Debian installs versioned names, e.g.
    # ld64.lld-14), tried in order after `name`.
    alternatives: tuple[str, ...] = ()

    def path(self) -> str | None:
        for name in (self.name, *self.alternatives):
            found = shutil.which(name)
            if found:
                return found
        return None

    def version(self) -> str | None:
        path = self.path()
        if path is None:
            return None
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            return None
        return _version_line(path, stamp, self.version_args, self.version_pattern)

    def require(self) -> str:
        path = self.path()
        if path is None:
            raise MissingToolchainError(
                f"{self.name} not found on PATH (needed for {self.purpose}); "
                f"install it: {self.install_hint}")
        return path


@functools.cache
def _version_line(path: str, stamp: int, args: tuple[str, ...], pattern: str | None) -> str | None:
    """What `path args` prints, run once per executable (path and modification time): a
    compile asks every tool's version for the cache key and again for the manifest."""
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    if pattern:
        lines = [line for line in lines if re.search(pattern, line)]
    return lines[0].strip() if lines else ""


class Target:
    """A compilation target. Subclasses are one file each and register an instance."""

    name: str = ""
    spec: str = ""  # the full `name[:variant]` it was created from (set by the registry)
    description: str = ""
    library_suffix: str = ".so"
    tools: tuple[Tool, ...] = ()
    # Store quantized weights row-interleaved in blocks of this many rows (fmc.quant.layout)
    # for kernels that give each SIMD lane a row; None keeps the schemes' row-major layout.
    row_block: int | None = None
    # `--target-json`: kernels are compiled for exactly this `tvm.target.Target` (set by
    # `registry.from_json`); None: the target's own (`default_tvm_target`).
    exact_tvm_target = None

    def tvm_target(self):
        """The `tvm.target.Target` kernels are compiled for."""
        exact = self.exact_tvm_target
        return exact if exact is not None else self.default_tvm_target()

    def default_tvm_target(self):
        """This target's own `tvm.target.Target` (its family, variant and limits)."""
        raise NotImplementedError

    def compute_dtype(self, preferred: str) -> str:
        """Activation dtype for a scheme that prefers `preferred`."""
        return preferred

    def schedule_passes(self) -> list:
        """(name, doc, tvm Pass) kernel-scheduling passes for the lower phase."""
        return []

    def configure_dot(self, choice: str | None) -> None:
        """`--cpu-dot`: only CPU targets have a choice of dot product."""
        if choice is not None:
            raise UsageError(f"--cpu-dot applies to cpu targets, not {self.spec or self.name}")

    def kernel_passes(self) -> list:
        """TVM passes that swap fused kernels for the target's own (the fuse phase's
        `target-kernels`, before the add→norm merge); the CPU's integer-dot GEMVs."""
        return []

    def default_disabled_passes(self) -> dict[str, str]:
        """Pipeline passes this target skips unless `--enable-pass` names them: name → why
        (e.g. a fusion whose kernels the target's schedules cannot handle yet)."""
        return {}

    @contextmanager
    def codegen_hooks(self) -> Iterator[None]:
        """TVM's process-wide hooks this target's code generation needs (an intrinsic
        lowering, a codegen callback), installed for the `with` block around `relax.build`
        and put back as they were after: a compile for one target never changes another."""
        yield

    def validate(self, library: Path, executable) -> dict:
        """Check the built library (and the executable it came from) as far as this machine
        allows; raise ArtifactError on a defect, return what was checked (recorded in the
        manifest)."""
        return {}

    def describe_build(self) -> dict:
        """Target-specific facts for the manifest (e.g. the GPU architectures compiled)."""
        return {}

    def build_options(self) -> dict:
        """Extra keyword arguments for `relax.build` (e.g. `system_lib` for static libraries)."""
        return {}

    def export(self, executable, path: Path) -> None:
        """Write the compiled library to `path`."""
        executable.export_library(str(path))

    def runtime_status(self) -> dict | None:
        """For `fmc doctor` / `fmc targets`: whether this machine can run the target's
        artifacts ({"ready", "problem", …}), found without building anything; None when
        nothing beyond the toolchain is worth reporting."""
        return None

    def describe(self) -> dict:
        target = self.tvm_target()
        return {"name": self.name, "spec": self.spec or self.name,
                "tvm_target": _target_json(target),
                "tools": {tool.name: tool.version() for tool in self.tools},
                **self.describe_build()}

    def check_toolchain(self) -> None:
        for tool in self.tools:
            tool.require()


class DlightGPUTarget(Target):
    """Shared by the GPU targets: dlight's GPU schedules, and the fusions dlight cannot
    schedule left off by default."""

    def schedule_passes(self) -> list:
        from fmc.lowering.passes.schedule_gpu import gpu_schedule_passes

        return gpu_schedule_passes()

    def default_disabled_passes(self) -> dict[str, str]:
        from fmc.lowering.passes.schedule_gpu import DLIGHT_UNSUPPORTED_PASSES

        return dict(DLIGHT_UNSUPPORTED_PASSES)

    def build_options(self) -> dict:
        from fmc.targets.tir_pipeline import gpu_tir_pipeline

        return {"tir_pipeline": gpu_tir_pipeline()}


@contextmanager
def global_func(name: str, function) -> Iterator[None]:
    """TVM global `name` is `function` inside the block, and whatever it was (or nothing)
    after: TVM's codegen looks its callbacks up by name in one process-wide table."""
    import tvm_ffi

    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, function, override=True)
    try:
        yield
    finally:
        if previous is None:
            tvm_ffi.remove_global_func(name)
        else:
            tvm_ffi.register_global_func(name, previous, override=True)


def _target_json(target) -> dict:
    """A TVM target as a JSON-safe dict (stable key order for reproducible manifests)."""
    def plain(value):
        if hasattr(value, "items"):
            return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
            return [plain(v) for v in value]
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        return str(value)

    return plain(target.export())
