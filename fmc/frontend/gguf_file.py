"""Load a GGUF file: metadata → ModelConfig, tensors → canonical HF names, tokenizer rebuilt.

Tensors are dequantized to float32 on demand with the `gguf` package, and llama.cpp's Q/K
row permutation (applied by convert_hf_to_gguf.py for arch "llama") is undone, so every
tensor equals what the Hugging Face checkpoint would hold.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fmc.errors import InputError
from fmc.frontend.gguf_tokenizer import tokenizer_from_gguf
from fmc.frontend.weights import TensorInfo
from fmc.model_config import ModelConfig

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# GGUF `general.architecture` → fmc architecture. Only "llama" files carry the Q/K permutation.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED_ARCHITECTURES = {"llama"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
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

    def __init__(self, path: Path, reader, fields: dict, config: ModelConfig):
        self.path = path
        self._reader = reader
        self._tensors = {}
        self._index: dict[str, TensorInfo] = {}
        permute = fields.get("general.architecture") in PERMUTED_ARCHITECTURES
        self._heads = {}
        readable: dict = {}
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
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
        return array

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """(GGML type name, stored blocks as [rows, bytes per row]) with Q/K rows unpermuted,
        for schemes that import quantized data without loss."""
        tensor = self._tensors[name]
        blocks = np.asarray(tensor.data)
        rows = self._index[name].shape[0]
        blocks = blocks.reshape(rows, -1)
        if name in self._heads:
            blocks = unpermute_rows(blocks, self._heads[name])
        return tensor.tensor_type.name, blocks

    def files(self) -> list[Path]:
        return [self.path]


def _config(fields: dict, reader, origin: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{origin}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")

    def get(key: str, default=...):
        full = f"{arch}.{key}"
        if full in fields:
            return fields[full]
        if default is ...:
            raise InputError(f"{origin}: GGUF metadata {full!r} is missing")
        return default

    if f"{arch}.rope.scaling.type" in fields or any(t.name == "rope_freqs.weight"
                                                      for t in reader.tensors):
        raise InputError(f"{origin}: GGUF RoPE scaling (rope_freqs) is not supported; "
                         "compile the Hugging Face checkpoint instead")
    tensor_names = {t.name for t in reader.tensors}
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = fields.get("tokenizer.ggml.tokens") or []
    eos = fields.get("tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            architecture=ARCHITECTURES[arch],
            vocab_size=int(get("vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length", hidden // heads if heads else 0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length")),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(eos,) if isinstance(eos, int) else (),
        )
    except InputError as exc:
        raise InputError(f"{origin}: {str(exc).removeprefix('config: ')}") from None


def open_gguf(path: Path, with_weights: bool = True, with_tokenizer: bool = True):
    """Return (config, weights or None, tokenizer file contents, input files)."""
    reader = _open_reader(path)
    fields = _field_values(reader, path)
    config = _config(fields, reader, str(path))
    weights = GGUFWeights(path, reader, fields, config) if with_weights else None
    tokenizer = {}
    if with_tokenizer:
        fields["context_length"] = config.max_position_embeddings
        tokenizer = tokenizer_from_gguf(fields, str(path))
    return config, weights, tokenizer, [path]
