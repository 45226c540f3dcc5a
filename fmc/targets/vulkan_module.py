"""TVM's serialised Vulkan module and the library blob that carries it, written by fmc (the
pinned wheel has no Vulkan codegen or runtime). Byte layouts (docs/targets.md, Vulkan),
from TVM's `src/backend/vulkan` and tvm-ffi's `library_module.cc`. Little-endian throughout;
strings and byte strings are u64 length + bytes, arrays and maps u64 count + items."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fmc.errors import ArtifactError

LIBRARY_SYMBOL = "__tvm_ffi__library_bin"
# DLDataType codes: int 0, uint 1, float 2, handle 3
DL_CODES = {"int": 0, "uint": 1, "float": 2, "bool": 1}
USE_UBO = 1  # shader flag bit 0: scalars in a uniform buffer instead of push constants


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ArtifactError("truncated Vulkan module or library blob")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def u(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def str(self) -> bytes:
        return self.take(self.u("Q"))


@dataclass
class KernelInfo:
    """What TVM's Vulkan runtime needs per kernel besides the SPIR-V."""
    name: str
    arg_types: list[str]  # "handle" for buffers, else the scalar dtype
    launch_params: list[str]
    spirv: bytes  # SPIR-V words, little-endian
    flags: int = 0


def _dl_type(dtype: str) -> bytes:
    if dtype == "handle":
        return struct.pack("<BBH", 3, 64, 1)
    for prefix, code in DL_CODES.items():
        if dtype.startswith(prefix):
            bits = 1 if dtype == "bool" else int(dtype[len(prefix):])
            return struct.pack("<BBH", code, bits, 1)
    raise ArtifactError(f"no DLDataType for {dtype}")


def _dl_name(code: int, bits: int) -> str:
    if code == 3:
        return "handle"
    return {0: "int", 1: "uint", 2: "float"}[code] + str(bits)


def encode_vulkan_module(kernels: list[KernelInfo]) -> bytes:
    """VulkanModuleNode::SaveToBytes: format, function table, SPIR-V map (sorted by name so
    the bytes are reproducible)."""
    kernels = sorted(kernels, key=lambda k: k.name)
    out = [_str(b"vulkan"), struct.pack("<Q", len(kernels))]
    for k in kernels:
        name = k.name.encode()
        out += [_str(name), _str(name), struct.pack("<Q", len(k.arg_types))]
        out += [_dl_type(t) for t in k.arg_types]
        out.append(struct.pack("<Q", len(k.launch_params)))
        out += [_str(tag.encode()) for tag in k.launch_params]
        out.append(struct.pack("<Q", len(k.arg_types)))  # arg_extra_tags: none
        out += [struct.pack("<i", 0) for _ in k.arg_types]
    out.append(struct.pack("<Q", len(kernels)))
    for k in kernels:
        if len(k.spirv) % 4:
            raise ArtifactError(f"{k.name}: SPIR-V is not a whole number of words")
        out += [_str(k.name.encode()), struct.pack("<IQ", k.flags, len(k.spirv) // 4), k.spirv]
    return b"".join(out)


def decode_vulkan_module(data: bytes) -> list[KernelInfo]:
    reader = _Reader(data)
    if reader.str() != b"vulkan":
        raise ArtifactError("not a Vulkan module")
    infos = {}
    for _ in range(reader.u("Q")):
        key = reader.str().decode()
        name = reader.str().decode()
        arg_types = []
        for _ in range(reader.u("Q")):
            code, bits, _lanes = struct.unpack("<BBH", reader.take(4))
            arg_types.append(_dl_name(code, bits))
        tags = [reader.str().decode() for _ in range(reader.u("Q"))]
        for _ in range(reader.u("Q")):
            reader.u("i")
        infos[key] = (name, arg_types, tags)
    kernels = []
    for _ in range(reader.u("Q")):
        key = reader.str().decode()
        flags, words = reader.u("I"), reader.u("Q")
        name, arg_types, tags = infos[key]
        kernels.append(KernelInfo(name, arg_types, tags, reader.take(4 * words), flags))
    if reader.pos != len(data):
        raise ArtifactError("trailing bytes after the Vulkan module")
    return kernels


@dataclass
class LibraryBlob:
    """The import tree packed into `__tvm_ffi__library_bin`: modules in CSR form (module i's
    imports are child_indices[indptr[i]:indptr[i+1]]), each a kind and its bytes ("_lib",
    the library itself, has none)."""
    indptr: list[int]
    children: list[int]
    modules: list[tuple[str, bytes | None]] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> LibraryBlob:
        reader = _Reader(data)
        size = reader.u("Q")
        if size != len(data) - 8:
            raise ArtifactError("library blob size field does not match its length")
        indptr = [reader.u("Q") for _ in range(reader.u("Q"))]
        children = [reader.u("Q") for _ in range(reader.u("Q"))]
        modules = []
        for _ in range(len(indptr) - 1):
            kind = reader.str().decode()
            modules.append((kind, None if kind == "_lib" else reader.str()))
        return cls(indptr, children, modules)

    def to_bytes(self) -> bytes:
        body = [struct.pack("<Q", len(self.indptr)), *(struct.pack("<Q", i) for i in self.indptr),
                struct.pack("<Q", len(self.children)),
                *(struct.pack("<Q", c) for c in self.children)]
        for kind, payload in self.modules:
            body.append(_str(kind.encode()))
            if kind != "_lib":
                body.append(_str(payload))
        data = b"".join(body)
        return struct.pack("<Q", len(data)) + data

    def add_import(self, parent: int, kind: str, payload: bytes) -> None:
        """Append a module imported by module `parent`."""
        index = len(self.modules)
        self.modules.append((kind, payload))
        insert_at = self.indptr[parent + 1]
        self.children.insert(insert_at, index)
        self.indptr = [p + (1 if i > parent else 0) for i, p in enumerate(self.indptr)]
        self.indptr.append(self.indptr[-1])

    def index_of(self, kind: str) -> int:
        return next(i for i, (k, _) in enumerate(self.modules) if k == kind)


def c_source(blob: bytes, symbol: str = LIBRARY_SYMBOL) -> str:
    """A C file defining the exported blob symbol (what TVM's own packer writes)."""
    rows = [",".join(f"0x{b:02x}" for b in blob[i:i + 20]) for i in range(0, len(blob), 20)]
    return ("#ifdef _WIN32\n#define FMC_EXPORT __declspec(dllexport)\n#else\n"
            "#define FMC_EXPORT __attribute__((visibility(\"default\")))\n#endif\n"
            f"FMC_EXPORT extern const unsigned char {symbol}[];\n"
            f"const unsigned char {symbol}[{len(blob)}] = {{\n  "
            + ",\n  ".join(rows) + "\n};\n")


def find_vulkan_module(library: bytes) -> list[KernelInfo]:
    """The Vulkan module inside a built library: the import entry is the kind string
    "vulkan" followed by the module bytes, which themselves start with "vulkan"."""
    marker = _str(b"vulkan")
    start = library.find(marker)
    while start != -1:
        size_at = start + len(marker)
        (size,) = struct.unpack_from("<Q", library, size_at)
        payload = library[size_at + 8:size_at + 8 + size]
        if payload.startswith(marker) and len(payload) == size:
            return decode_vulkan_module(payload)
        start = library.find(marker, start + 1)
    raise ArtifactError("the library holds no Vulkan module")
