"""Make TVM's CUDA runtime available on a build machine without an NVIDIA driver.

TVM's CUDA codegen lives in `libtvm_runtime_cuda.so`, which links `libcuda.so.1`; when the
driver is absent, `import tvm` skips that library silently and a CUDA build would then embed
CUDA *source* compiled at load time (docs/targets.md, CUDA). Building needs only
the library's symbols, so fmc loads a stub `libcuda.so.1` (every entry point returns
CUDA_ERROR_NO_DEVICE) and then TVM's CUDA runtime. On a machine with a driver the real one
is used and nothing is stubbed."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

from fmc.errors import ArtifactError, MissingToolchainError
from fmc.paths import cache_dir

# The driver entry points libtvm_runtime_cuda.so binds at load time.
STUB_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                "cuTensorMapEncodeTiled")
CUDA_ERROR_NO_DEVICE = 100
LOADER_FUNCTION = "ffi.Module.load_from_bytes.cuda"  # registered by TVM's CUDA runtime


def _stub_library() -> Path:
    directory = cache_dir() / "libcuda-stub"
    library = directory / "libcuda.so.1"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "libcuda_stub.c"
    source.write_text("".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n"
                              for name in STUB_SYMBOLS))
    partial = directory / f"libcuda.so.1.{os.getpid()}.tmp"
    try:
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                        str(partial), str(source)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise MissingToolchainError(f"cannot build the libcuda stub with gcc ({detail.strip()})"
                                    "; install gcc: apt-get install gcc") from None
    partial.replace(library)  # atomic: concurrent builds never load a half-written stub
    return library


_state: dict[str, bool] = {}


def driver_is_stub() -> bool:
    """True when this process runs on the stub (no real NVIDIA driver)."""
    return _state.get("stub", False)


def cuda_device(device_id: int = 0):
    """The GPU CUDA artifacts run on; refused where only the stub driver is loaded."""
    import tvm

    ensure_cuda_runtime()
    if driver_is_stub():
        raise ArtifactError("no NVIDIA driver on this machine (libcuda.so.1 not found): "
                            "CUDA artifacts build here but run only on a GPU machine")
    return tvm.cuda(device_id)


def ensure_cuda_runtime() -> None:
    """Load libcuda (real, else the stub) and TVM's CUDA runtime, once per process."""
    import tvm

    if tvm.get_global_func(LOADER_FUNCTION, allow_missing=True) is not None:
        return
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        _state["stub"] = False
    except OSError:
        ctypes.CDLL(str(_stub_library()), mode=ctypes.RTLD_GLOBAL)
        _state["stub"] = True
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        raise MissingToolchainError(f"TVM's CUDA runtime cannot be loaded ({exc})") from None
    if tvm.get_global_func(LOADER_FUNCTION, allow_missing=True) is None:
        raise MissingToolchainError("TVM's CUDA runtime loaded but registered no CUDA module "
                                    "loader; this apache-tvm wheel lacks CUDA support")
