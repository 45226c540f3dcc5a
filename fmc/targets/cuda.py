"""`cuda`: NVIDIA GPUs. Kernels are scheduled with TVM's dlight GPU rules and compiled ahead of
time by nvcc into one fatbin holding SASS for every requested architecture plus PTX for the
newest (forward compatibility), embedded in the shared library: nothing is compiled when the
artifact loads. Builds on machines without a GPU or driver (fmc/devices/cuda_driver.py).

    cuda                      sm_75, sm_80, sm_86, sm_89, sm_90 + compute_90 PTX
    cuda:sm_80,sm_90          the listed architectures + PTX of the newest
"""

from __future__ import annotations

import glob
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmc.errors import ArtifactError, UsageError
from fmc.targets.base import DlightGPUTarget, Target, Tool, global_func
from fmc.targets.registry import register

DEFAULT_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
ARCH = re.compile(r"sm_(\d{2,3})[a-z]?")
# Limits shared by every architecture above (TVM warns and guesses without them).
DEVICE_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                 "thread_warp_size": 32}


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """nvcc flags: SASS per architecture, and PTX for later GPUs.

    nvcc's front end (cicc, about three quarters of a compile) runs once per *virtual*
    architecture, so the architectures of one major version share the PTX of the oldest of
    them: `arch=compute_80,code=[sm_80,sm_86,sm_89]`, the form CUDA libraries ship. The SASS
    is still built per architecture; what the newer minor versions give up is cicc's own
    choices for them (on the tiny test model one kernel's instruction order). Arch-specific
    variants (sm_90a) keep their own PTX. The PTX embedded for forward compatibility is the
    newest group's."""
    groups: dict[str, list[str]] = {}
    for arch in sorted(dict.fromkeys(archs), key=_arch_order):
        number = ARCH.fullmatch(arch).group(1)
        major = arch if not arch[3:].isdigit() else number[:-1]
        groups.setdefault(major, []).append(arch)
    ptx = ptx_architecture(archs)
    flags = []
    for members in groups.values():
        virtual = members[0][3:]
        codes = members + ([ptx] if f"compute_{virtual}" == ptx else [])
        flags += ["-gencode", f"arch=compute_{virtual},code=[{','.join(codes)}]"]
    return flags


def ptx_architecture(archs: tuple[str, ...]) -> str:
    """The virtual architecture whose PTX the fatbin carries for later GPUs: the newest
    portable group's (arch-specific PTX such as compute_90a runs nowhere else)."""
    portable = [arch for arch in archs if arch[3:].isdigit()] or list(archs)
    newest = max(portable, key=_arch_order)
    same_major = [a for a in portable if a[3:].isdigit() == newest[3:].isdigit()
                  and ARCH.fullmatch(a).group(1)[:-1] == ARCH.fullmatch(newest).group(1)[:-1]]
    return f"compute_{min(same_major, key=_arch_order)[3:]}"


def _arch_order(arch: str) -> tuple[int, str]:
    return int(ARCH.fullmatch(arch).group(1)), arch


FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def extract_fatbins(library: bytes) -> list[bytes]:
    """The fatbin containers embedded in a library (TVM stores them inside its module blob):
    u32 magic, u16 version, u16 header size, u64 payload size, then the payload."""
    found, start = [], library.find(FATBIN_MAGIC)
    while start != -1:
        header_size, payload_size = struct.unpack_from("<HQ", library, start + 6)
        end = start + header_size + payload_size
        if header_size < 16 or end > len(library):
            raise ArtifactError("a fatbin header in the library claims more bytes than exist")
        found.append(library[start:end])
        start = library.find(FATBIN_MAGIC, end)
    return found


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, else from the PyPI package `nvidia-cuda-cuobjdump`."""
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    for entry in sys.path:
        matches = sorted(glob.glob(str(Path(entry) / "nvidia" / "cu*" / "bin" / "cuobjdump")))
        if matches:
            return matches[-1]
    return None


def fatbin_contents(fatbin: Path, cuobjdump: str) -> dict[str, list[str]]:
    """{"elf": ["sm_75", …], "ptx": ["sm_90"]} as cuobjdump lists them."""
    contents = {}
    for kind in ("elf", "ptx"):
        out = subprocess.run([cuobjdump, f"--list-{kind}", str(fatbin)], capture_output=True,
                             text=True, check=True).stdout
        contents[kind] = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.", out)))
    return contents


class CUDA(DlightGPUTarget):
    name = "cuda"
    description = ("NVIDIA GPU: dlight schedules, multi-arch fatbin (SASS + PTX) compiled by "
                   "nvcc at build time")
    tools = (Tool("nvcc", "compiling CUDA kernels into a fatbin",
                  "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads)",
                  version_pattern=r"release \d"),
             Tool("g++", "linking the shared library", "apt-get install g++"))

    def __init__(self, archs: tuple[str, ...] = DEFAULT_ARCHS):
        self.archs = archs

    def default_tvm_target(self):
        import tvm

        # Code generation follows the oldest architecture so that every SASS build is legal;
        # the host code is generic x86-64, not the build machine's CPU.
        oldest = min(self.archs, key=lambda a: int(ARCH.fullmatch(a).group(1)))
        return tvm.target.Target({"kind": "cuda", "arch": oldest, **DEVICE_LIMITS},
                                 host={"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"})

    @contextmanager
    def codegen_hooks(self) -> Iterator[None]:
        from tvm.support import nvcc

        from fmc.devices.cuda_driver import ensure_cuda_runtime

        ensure_cuda_runtime()
        flags = gencode_flags(self.archs)

        def compile_fatbin(code: str) -> bytes:
            # --threads 0: one nvcc worker per virtual and per real architecture, as many as
            # there are cores
            return nvcc.compile_cuda(code, target_format="fatbin", arch=list(flags),
                                     options=["--threads", "0"], compiler="nvcc")

        # TVM's CUDA codegen calls this global once per module with all kernels' source.
        with global_func("tvm_callback_cuda_compile", compile_fatbin):
            yield

    def validate(self, library: Path, executable=None) -> dict:
        """The library must hold a fatbin (else TVM embedded CUDA source, which would be
        compiled at load time); with cuobjdump, it must list every requested SASS arch and
        the PTX."""
        fatbins = extract_fatbins(library.read_bytes())
        if not fatbins:
            raise ArtifactError(f"{library}: holds no CUDA fatbin (TVM's CUDA runtime was not "
                                "loaded at build time, so kernels were kept as source)")
        cuobjdump = find_cuobjdump()
        if cuobjdump is None:
            return {"fatbins": len(fatbins), "checked_with": None}
        wanted_ptx = "sm_" + self.describe_build()["ptx"].split("_")[1]
        path = library.with_name(library.name + ".fatbin")
        try:
            path.write_bytes(fatbins[0])
            contents = fatbin_contents(path, cuobjdump)
        finally:
            path.unlink(missing_ok=True)
        missing = sorted(set(self.archs) - set(contents["elf"]))
        if missing or wanted_ptx not in contents["ptx"]:
            raise ArtifactError(f"{library}: fatbin lacks {missing or ['PTX ' + wanted_ptx]} "
                                f"(cuobjdump lists SASS {contents['elf']}, PTX "
                                f"{contents['ptx']})")
        return {"fatbins": len(fatbins), "checked_with": "cuobjdump", **contents}

    def describe_build(self) -> dict:
        return {"cuda_archs": list(self.archs), "ptx": ptx_architecture(self.archs)}



@register("cuda")
def make_cuda(variant: str | None) -> Target:
    if variant is None:
        return CUDA()
    archs = tuple(a.strip() for a in variant.split(",") if a.strip())
    bad = [a for a in archs if not ARCH.fullmatch(a) or int(ARCH.fullmatch(a).group(1)) < 50]
    if not archs or bad:
        raise UsageError(f"target cuda:{variant}: architectures are sm_NN (sm_50 or newer), "
                         f"comma-separated, e.g. cuda:sm_80,sm_90")
    return CUDA(tuple(dict.fromkeys(archs)))
