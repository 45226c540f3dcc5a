"""Load a GGUF file: metadata → ModelConfig, tensors → canonical HF names, tokenizer rebuilt.

The family (fmc/frontend/archs/) is found by `general.architecture`; it maps the metadata to
a config and the tensor names to its parameters. Tensors are dequantized to float32 on demand
with the `gguf` package, and llama.cpp's Q/K row permutation (applied by convert_hf_to_gguf.py
for arch "llama") is undone where the family says so, as is the +1 it adds to gemma's norm
weights, so every tensor equals what the Hugging Face checkpoint would hold.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fmc.errors import InputError
from fmc.frontend.archs.registry import GGUF_GLOBAL_NAMES as GLOBAL_NAMES
from fmc.frontend.archs.registry import GGUF_LAYER_NAMES as LAYER_NAMES
from fmc.frontend.gguf_tokenizer import tokenizer_from_gguf
from fmc.frontend.weights import TensorInfo
from fmc.model_config import ModelConfig

LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, arch=None) -> str | None:
    """The model's parameter name of a GGUF tensor, by the family's name tables (`arch`, an
    `Architecture`; None: the llama-style tables)."""
    global_names = GLOBAL_NAMES if arch is None else arch.gguf_global_names
    layer_names = LAYER_NAMES if arch is None else arch.gguf_layer_names
    if gguf_name in global_names:
        return global_names[gguf_name]
    match = LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in layer_names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{layer_names[part]}.{kind}"
    return None


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's `permute`: interleaved rotary pairs back to HF halves."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# GGUF value type → byte size of one scalar (8 = string, 9 = array are variable-sized).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_NESTING = 4  # llama.cpp writes flat arrays; deeper nesting is corruption


def check_metadata_bounds(path: Path) -> None:
    """Walk the key/value section and refuse counts that run past the end of the file.

    gguf-py reads an array element by element and treats a read past the end as a
    zero-byte value, so a corrupt count of 2**60 would loop forever; fuzzing found it.
    """
    import mmap
    import struct

    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size < 24:
            return  # too short to hold a header: gguf-py's own error says so
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                return
            order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
            if struct.unpack_from(order + "I", data, 4)[0] not in (2, 3):
                return  # gguf-py refuses other versions itself
            offset = 24

            def take(fmt: str) -> int:
                nonlocal offset
                width = struct.calcsize(fmt)
                if offset + width > size:
                    raise InputError(f"{path}: not a readable GGUF file (truncated or corrupt: "
                                     f"metadata runs past the end at byte {offset})")
                value = struct.unpack_from(order + fmt, data, offset)[0]
                offset += width
                return value

            def need(count: int, width: int) -> None:
                if count > (size - offset) // width:
                    raise InputError(f"{path}: not a readable GGUF file (truncated or corrupt: "
                                     f"{count} metadata values at byte {offset} exceed the file)")

            def skip(count: int, width: int) -> None:
                nonlocal offset
                need(count, width)
                offset += count * width

            def value(kind: int, depth: int = 0) -> None:
                if kind in _SCALAR_SIZES:
                    skip(1, _SCALAR_SIZES[kind])
                elif kind == _STRING:
                    skip(take("Q"), 1)
                elif kind == _ARRAY and depth < _MAX_ARRAY_NESTING:
                    element, count = take("I"), take("Q")
                    if element in _SCALAR_SIZES:
                        skip(count, _SCALAR_SIZES[element])
                        return
                    need(count, 8 if element == _STRING else 12)  # the smallest such element
                    for _ in range(count):
                        value(element, depth + 1)
                else:
                    raise InputError(f"{path}: not a readable GGUF file (unsupported metadata "
                                     f"value type {kind} at byte {offset - 4})")

            for _ in range(struct.unpack_from(order + "Q", data, 16)[0]):
                skip(take("Q"), 1)  # key
                value(take("I"))


def _open_reader(path: Path):
    import gguf

    check_metadata_bounds(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise InputError(f"{path}: not a readable GGUF file (truncated or corrupt: {exc})") \
            from None


def _field_values(reader, path: Path) -> dict:
    values = {}
    for key, field in reader.fields.items():
        try:
            values[key] = field.contents()
        except (ValueError, IndexError, TypeError, UnicodeDecodeError):
            raise InputError(f"{path}: GGUF field {key!r} is corrupt") from None
    return values


def _can_dequantize(kind) -> bool:
    """Whether gguf-py dequantizes this tensor type: checked on one zero block at import,
    so an unreadable tensor fails the compile before any kernel is built."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)
    except NotImplementedError:
        return False
    except (ValueError, TypeError):  # plain float types take element arrays, not bytes
        return True
    return True


class GGUFWeights:
    """A GGUF file's tensors under canonical names, dequantized one at a time."""

    def __init__(self, path: Path, reader, fields: dict, config: ModelConfig, arch):
        self.path = path
        self._reader = reader
        self._tensors = {}
        self._index: dict[str, TensorInfo] = {}
        permute = arch.gguf_permuted_qk
        self._heads = {}
        self._offsets: dict[str, float] = {}
        readable: dict = {}
        for tensor in reader.tensors:
            if tensor.name in arch.gguf_config_tensors:
                continue  # configuration, read by the family's config_from_gguf
            name = hf_name(tensor.name, arch)
            if name is None:
                raise InputError(f"{path}: tensor {tensor.name!r} has no mapping in fmc "
                                 "(unsupported model variant?)")
            kind = tensor.tensor_type
            if readable.setdefault(kind, _can_dequantize(kind)) is False:
                raise InputError(f"{path}: tensor {tensor.name!r} has GGUF type {kind.name}, "
                                 "which fmc cannot read (gguf has no dequantizer for it)")
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            self._tensors[name] = tensor
            self._index[name] = TensorInfo(name, shape, f"gguf:{tensor.tensor_type.name}", path)
            if permute and name.endswith("q_proj.weight"):
                self._heads[name] = config.num_attention_heads
            elif permute and name.endswith("k_proj.weight"):
                self._heads[name] = config.num_key_value_heads
            for suffix, offset in arch.gguf_weight_offsets.items():
                if name.endswith(suffix):
                    self._offsets[name] = offset

    def index(self) -> dict[str, TensorInfo]:
        return dict(self._index)

    def load(self, name: str) -> np.ndarray:
        import gguf

        tensor = self._tensors[name]
        shape = self._index[name].shape
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise InputError(f"{self.path}: tensor {tensor.name!r} has GGUF type "
                             f"{tensor.tensor_type.name}, which gguf cannot dequantize") from None
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if name in self._heads:
            array = unpermute_rows(array, self._heads[name])
        if name in self._offsets:
            array = array + np.float32(self._offsets[name])
        return array

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """(GGML type name, stored blocks as [rows, bytes per row]) with Q/K rows unpermuted,
        for schemes that import quantized data without loss."""
        tensor = self._tensors[name]
        if name in self._offsets:  # stored shifted: only the dequantized values can be fixed
            raise InputError(f"{self.path}: tensor {tensor.name!r} is stored with an offset "
                             "and cannot be imported without dequantizing")
        blocks = np.asarray(tensor.data)
        rows = self._index[name].shape[0]
        blocks = blocks.reshape(rows, -1)
        if name in self._heads:
            blocks = unpermute_rows(blocks, self._heads[name])
        return tensor.tensor_type.name, blocks

    def files(self) -> list[Path]:
        return [self.path]


def _architecture(fields: dict, origin: str):
    from fmc.frontend.archs import registry

    name = fields.get("general.architecture")
    arch = registry.by_gguf_architecture(name) if isinstance(name, str) else None
    if arch is None or arch.config_from_gguf is None:
        raise InputError(f"{origin}: GGUF architecture {name!r} is not supported; supported: "
                         f"{', '.join(registry.gguf_architectures())}")
    return arch


def _config(fields: dict, reader, origin: str, arch) -> ModelConfig:
    from fmc.frontend.architectures import GGUFMetadata

    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        import gguf

        tensor = tensors[name]
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                          dtype=np.float32).reshape(-1)

    return arch.config_from_gguf(GGUFMetadata(fields, set(tensors), origin, read))


def open_gguf(path: Path, with_weights: bool = True, with_tokenizer: bool = True):
    """Return (config, weights or None, tokenizer file contents, input files)."""
    reader = _open_reader(path)
    fields = _field_values(reader, path)
    arch = _architecture(fields, str(path))
    config = _config(fields, reader, str(path), arch)
    weights = GGUFWeights(path, reader, fields, config, arch) if with_weights else None
    if weights is not None and arch.fused_weights:
        from fmc.frontend.fused_weights import SplitFusedWeights

        weights = SplitFusedWeights(weights, arch.fused_weights, config)
    tokenizer = {}
    if with_tokenizer:
        fields["context_length"] = config.max_position_embeddings
        if "tokenizer.chat_template" not in fields and arch.chat_template is not None:
            fields["tokenizer.chat_template"] = arch.chat_template
        tokenizer = tokenizer_from_gguf(fields, str(path))
    return config, weights, tokenizer, [path]
