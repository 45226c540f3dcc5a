"""The device an artifact runs on, chosen from the kind of device its manifest says the
library was built for — not by resolving the compile-time target (which would import every
target plugin and its toolchain checks)."""

from __future__ import annotations

from fmc.artifacts.manifest import TargetInfo
from fmc.errors import ArtifactError


def _cpu():
    import tvm

    return tvm.cpu()


def _cuda():
    from fmc.devices.cuda_driver import cuda_device

    return cuda_device()


def _vulkan():
    from fmc.devices.vulkan_runtime import vulkan_device

    return vulkan_device()  # fmc's own runtime plugin: the wheel has none


# device kind → the device; TVM's runtime in this wheel has no Metal device.
OPENERS = {"cpu": _cpu, "cuda": _cuda, "vulkan": _vulkan}


def device_for(target: TargetInfo):
    opener = OPENERS.get(target.device_kind)
    if opener is None:
        raise ArtifactError(f"artifacts for target {target.requested!r} cannot run on this "
                            "machine")
    return opener()


def host_device(target: TargetInfo):
    """This machine's CPU for a library built for it, else None (`fmc verify` loads only
    those: a GPU library needs its device and driver)."""
    return _cpu() if target.device_kind == "cpu" else None
