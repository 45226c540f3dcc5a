"""`vulkan`: any Vulkan 1.2 GPU, through fmc's own SPIR-V route (the pinned TVM wheel has no
Vulkan codegen): dlight schedules → lowered device TIR → GLSL (fmc/targets/vulkan_glsl.py) →
SPIR-V by glslc → TVM's serialised Vulkan module (fmc/targets/vulkan_module.py), embedded in
the shared library next to the host code, where TVM's Vulkan runtime finds its kernels:
fmc's own plugin (fmc/devices/vulkan_runtime.py) on the pinned wheel, or a TVM built with
USE_VULKAN=ON. Verified by running whole models on Mesa's lavapipe."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmc.errors import ArtifactError, UsageError
from fmc.targets.base import DlightGPUTarget, Target, Tool, global_func
from fmc.targets.registry import register

GLSLC = Tool("glslc", "compiling the generated GLSL kernels to SPIR-V", "apt-get install glslc")
SPIRV_VAL = Tool("spirv-val", "validating the SPIR-V kernels", "apt-get install spirv-tools")
SPIRV_ENV = "vulkan1.2"
# Features the shaders use (Vulkan 1.2 core or near-universal extensions): fp16 arithmetic,
# 8/16-bit storage, int64.
TARGET_FEATURES = {"supports_float16": True, "supports_int64": True, "supports_int8": True,
                   "supports_int16": True, "supports_16bit_buffer": True,
                   "supports_8bit_buffer": True,
                   "supports_storage_buffer_storage_class": True,
                   "max_shared_memory_per_block": 16384, "max_num_threads": 256}


def compile_glsl(name: str, glsl: str, glslc: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="fmc-glsl-") as directory:
        source, output = Path(directory) / f"{name}.comp", Path(directory) / f"{name}.spv"
        source.write_text(glsl)
        result = subprocess.run([glslc, "-fshader-stage=compute", f"--target-env={SPIRV_ENV}",
                                 "-O", "-o", str(output), str(source)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["glslc failed"])[0]
            raise ArtifactError(f"kernel {name}: generated GLSL does not compile: {first}")
        return output.read_bytes()


def validate_spirv(name: str, spirv: bytes, spirv_val: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=".spv") as handle:
        handle.write(spirv)
        handle.flush()
        result = subprocess.run([spirv_val, "--target-env", SPIRV_ENV, handle.name],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise ArtifactError(f"kernel {name}: invalid SPIR-V: {result.stderr.strip()}")


class Vulkan(DlightGPUTarget):
    name = "vulkan"
    description = ("Vulkan 1.2 GPU via fmc's GLSL→SPIR-V route (TVM's Vulkan module in the "
                   "shared library)")
    tools = (GLSLC, SPIRV_VAL, Tool("g++", "linking the shared library", "apt-get install g++"))

    def __init__(self):
        self.kernels: list = []  # KernelInfo of the last build
        self.shaders: dict = {}  # kernel name → Shader (GLSL, parameters, launch grid)

    def default_tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "vulkan", **TARGET_FEATURES},
                                 host={"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"})

    @contextmanager
    def codegen_hooks(self) -> Iterator[None]:
        """fmc's SPIR-V route as TVM's Vulkan code generator for this build; the kernels
        it makes are this target's (`kernels`, `shaders`: read by `export` and `validate`),
        and TVM's generator (none in the wheel) is back after the block."""
        import tvm

        glslc = GLSLC.require()
        kernels, shaders = [], {}

        def build_vulkan(mod, _target):
            """TVM's codegen hook for device kernels: fmc's SPIR-V, kept for `export`; the
            host build gets an empty C module in place of TVM's (absent) Vulkan module."""
            from fmc.targets.vulkan_glsl import emit_shader
            from fmc.targets.vulkan_module import KernelInfo

            for gv, func in mod.functions_items():
                name = str((func.attrs or {}).get("global_symbol", gv.name_hint))
                shader = shaders[name] = emit_shader(name, func)
                spirv = compile_glsl(name, shader.glsl, glslc)
                arg_types = ["handle" if p.is_buffer else p.dtype for p in shader.params]
                kernels.append(KernelInfo(name, arg_types, shader.launch_params, spirv))
            return tvm.get_global_func("runtime.CSourceModuleCreate")("/* fmc: kernels are "
                                                                       "SPIR-V */\n", "c", [],
                                                                       [])

        self.kernels, self.shaders = kernels, shaders  # this build's, not an earlier one's
        with global_func("target.build.vulkan", build_vulkan):
            yield

    def export(self, executable, path: Path) -> None:
        from fmc.targets.vulkan_module import LibraryBlob, c_source, encode_vulkan_module

        vulkan_module = encode_vulkan_module(self.kernels)

        def pack_imports(module, is_system_lib, prefix, workspace_dir):
            import tvm

            if is_system_lib:
                raise UsageError("vulkan: system libraries are not supported")
            tensor = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module)
            blob = LibraryBlob.parse(bytes(tensor.numpy().tobytes()))
            blob.add_import(blob.index_of("_lib"), "vulkan", vulkan_module)
            source = Path(workspace_dir) / "devc.c"
            source.write_text(c_source(blob.to_bytes(), prefix + "__tvm_ffi__library_bin"))
            return str(source)

        executable.export_library(str(path), fpack_imports=pack_imports)

    def validate(self, library: Path, executable) -> dict:
        from fmc.targets.vulkan_module import encode_vulkan_module

        spirv_val = SPIRV_VAL.require()
        for kernel in self.kernels:
            validate_spirv(kernel.name, kernel.spirv, spirv_val)
        if encode_vulkan_module(self.kernels) not in library.read_bytes():
            raise ArtifactError(f"{library}: the Vulkan module is missing from the library")
        return {"spirv_kernels": len(self.kernels), "checked_with": f"spirv-val {SPIRV_ENV}"}

    def runtime_status(self) -> dict:
        from fmc.devices.vulkan_runtime import status

        return status()


@register("vulkan")
def make_vulkan(variant: str | None) -> Target:
    if variant is not None:
        raise UsageError(f"target vulkan:{variant}: vulkan has no variants")
    return Vulkan()
