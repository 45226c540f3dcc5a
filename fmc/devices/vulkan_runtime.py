"""fmc's Vulkan runtime plugin for the pinned TVM wheel, which ships no Vulkan runtime.

`native/fmc_vulkan_runtime.cc` registers TVM's `device_api.vulkan` and the loader of the
"vulkan" module fmc embeds in its libraries (`ffi.Module.load_from_bytes.vulkan`). It is
built with the system g++ against the wheel's own headers the first time a Vulkan artifact
is loaded, into fmc's cache keyed by the TVM version and the source's hash (like the CUDA
stub in cuda_driver.py), and loaded with RTLD_GLOBAL after `import tvm` so its static
registrations reach TVM's global function table."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
from pathlib import Path

from fmc.errors import DeviceError, MissingToolchainError
from fmc.paths import cache_dir

SOURCE = Path(__file__).parent / "native" / "fmc_vulkan_runtime.cc"
VULKAN_LOADER = "libvulkan.so.1"  # the Khronos loader (Debian libvulkan1)
VULKAN_HEADER = Path("/usr/include/vulkan/vulkan.h")  # Debian libvulkan-dev
MODULE_LOADER = "ffi.Module.load_from_bytes.vulkan"
INSTALL_HINT = "apt-get install g++ libvulkan-dev"
DEVICE_HINT = ("install a Vulkan 1.2 driver (mesa-vulkan-drivers provides lavapipe, a CPU "
               "implementation)")


def _tvm_dirs() -> tuple[list[Path], list[Path]]:
    """Include and library directories of the installed tvm and tvm_ffi packages."""
    import tvm
    import tvm_ffi

    tvm_root, ffi_root = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    includes = [tvm_root / "include", ffi_root / "include"]
    libraries = [tvm_root / "lib", ffi_root / "lib"]
    return includes, libraries


def plugin_path() -> Path:
    source = SOURCE.read_bytes()
    version = importlib.metadata.version("apache-tvm")
    key = hashlib.sha256(source + version.encode()).hexdigest()[:16]
    return cache_dir() / "vulkan-runtime" / f"fmc_vulkan_runtime-{version}-{key}.so"


def build_plugin() -> Path:
    """The plugin in fmc's cache, compiled on first use (5–9 s on 2 cores)."""
    library = plugin_path()
    if library.is_file():
        return library
    compiler = shutil.which("g++")
    if compiler is None:
        raise MissingToolchainError(f"g++ not found on PATH (needed to build fmc's Vulkan "
                                    f"runtime); install it: {INSTALL_HINT}")
    if not VULKAN_HEADER.is_file():
        raise MissingToolchainError(f"Vulkan headers not found ({VULKAN_HEADER}; needed to "
                                    f"build fmc's Vulkan runtime); install them: "
                                    f"{INSTALL_HINT}")
    includes, libraries = _tvm_dirs()
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-o", str(partial),
               str(SOURCE), *(f"-I{d}" for d in includes), *(f"-L{d}" for d in libraries),
               *(f"-Wl,-rpath,{d}" for d in libraries), "-ltvm_runtime", "-ltvm_ffi",
               f"-l:{VULKAN_LOADER}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        raise MissingToolchainError(f"cannot build fmc's Vulkan runtime with g++ "
                                    f"({(lines or [result.stderr.strip()])[0]}); "
                                    f"install: {INSTALL_HINT}")
    partial.replace(library)  # atomic: a concurrent process never loads a half-written file
    return library


_loaded: list[bool] = []  # the plugin, once loaded in this process


def ensure_vulkan_runtime() -> None:
    """Load the Vulkan loader and the plugin (built if needed), once per process."""
    import tvm

    try:
        ctypes.CDLL(VULKAN_LOADER, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise DeviceError(f"no Vulkan loader ({VULKAN_LOADER}) on this machine; install it "
                          f"(apt-get install libvulkan1) and {DEVICE_HINT}") from None
    if _loaded:
        return
    ctypes.CDLL(str(build_plugin()), mode=ctypes.RTLD_GLOBAL)
    _loaded.append(True)
    if tvm.get_global_func(MODULE_LOADER, allow_missing=True) is None:
        raise MissingToolchainError("fmc's Vulkan runtime loaded but registered nothing")


def vulkan_device(device_id: int = 0):
    """tvm.vulkan(device_id) once the runtime is loaded and the device exists."""
    import tvm

    ensure_vulkan_runtime()
    device = tvm.vulkan(device_id)
    if not device.exist:
        reason = device_info().get("error") or f"device {device_id} does not exist"
        raise DeviceError(f"no Vulkan device: {reason}; {DEVICE_HINT}")
    return device


def device_info() -> dict:
    """Device 0's name and API version and the device count, or the reason there is none."""
    import tvm

    fields = str(tvm.get_global_func("fmc.vulkan.info")()).split("\t")
    if fields[0] == "error":
        return {"error": fields[1]}
    return {"name": fields[0], "api_version": fields[1], "devices": int(fields[2])}


class _InstanceInfo(ctypes.Structure):  # VkInstanceCreateInfo
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.c_void_p), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p),
                ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


def list_devices() -> list[str]:
    """Names of the Vulkan devices the loader sees, asked through libvulkan directly (no
    plugin needed); raises DeviceError without a loader."""
    try:
        vk = ctypes.CDLL(VULKAN_LOADER)
    except OSError:
        raise DeviceError(f"no Vulkan loader ({VULKAN_LOADER}) on this machine; install it "
                          f"(apt-get install libvulkan1) and {DEVICE_HINT}") from None
    instance = ctypes.c_void_p()
    info = _InstanceInfo(sType=1)  # VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO
    if vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance)) != 0:
        return []  # no driver (ICD)
    try:
        count = ctypes.c_uint32()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ctypes.c_void_p * count.value)()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        names = []
        for handle in handles[:count.value]:
            props = ctypes.create_string_buffer(4096)  # VkPhysicalDeviceProperties (< 1 KiB)
            vk.vkGetPhysicalDeviceProperties(ctypes.c_void_p(handle), props)
            names.append(props.raw[20:276].split(b"\0")[0].decode(errors="replace"))
        return names
    finally:
        vk.vkDestroyInstance(instance, None)


def status() -> dict:
    """For `fmc doctor` and `fmc targets`, without building anything: the loader, the
    devices it sees, and whether the runtime plugin is built or can be."""
    report: dict = {"loader": False, "devices": [], "plugin": None, "ready": False,
                    "problem": None}
    try:
        report["devices"] = list_devices()
        report["loader"] = True
    except DeviceError as exc:
        report["problem"] = str(exc)
        return report
    library = plugin_path()
    if library.is_file():
        report["plugin"] = "built"
    elif shutil.which("g++") and VULKAN_HEADER.is_file():
        report["plugin"] = "buildable"  # built on the first Vulkan run (5–9 s)
    else:
        report["problem"] = f"cannot build fmc's Vulkan runtime: {INSTALL_HINT}"
    if not report["devices"] and report["problem"] is None:
        report["problem"] = f"no Vulkan device; {DEVICE_HINT}"
    report["ready"] = report["problem"] is None
    return report
