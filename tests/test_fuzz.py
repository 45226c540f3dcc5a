"""Fuzzing the readers of untrusted files: safetensors headers, GGUF, manifest.json and
fmc.toml. Whatever the bytes, a reader returns or raises fmc's own error (a clean one-line
message), never another exception, and never allocates more than the file holds.

Hypothesis runs a fixed number of derandomized examples per reader (bounded time in CI,
the same examples every run); `test_atheris_fuzz_targets` additionally runs libFuzzer through
atheris for a few seconds per reader."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_targets import read_build_file, read_gguf, read_manifest_file, read_safetensors
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fmc.errors import ArtifactError, InputError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
MODEL = "llama-gqa-untied"
FUZZ_TARGETS = Path(__file__).parent / "fuzz_targets.py"


class Seeds(dict):
    def __repr__(self) -> str:  # hypothesis prints fixtures in falsifying examples
        return "seeds"


@pytest.fixture(scope="module")
def seeds(tiny_checkpoint, tiny_artifact, tmp_path_factory):
    """Valid files to mutate: a safetensors file, a GGUF file, a manifest, an fmc.toml."""
    from models import write_gguf_from_checkpoint

    directory = tmp_path_factory.mktemp("fuzz-seeds")
    checkpoint = tiny_checkpoint(MODEL)
    gguf = write_gguf_from_checkpoint(checkpoint, directory / "seed.gguf")
    return Seeds({"safetensors": (checkpoint / "model.safetensors").read_bytes(),
            "gguf": gguf.read_bytes(),
            "artifact": tiny_artifact(MODEL),
            "toml": b'[defaults]\ntarget = "cpu"\noutput_dir = "out"\n\n[build.a]\nmodel = "m"\n'
                    b'quant = "q4f16"\ncontext_window = 64\n\n[matrix.b]\nmodel = "m"\n'
                    b'quants = ["q0f32", "q8f16"]\ntargets = ["cpu"]\n'})


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """Overwrite bytes at positions (mod length) and optionally truncate."""
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut is not None else buffer)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12)
CUTS = st.none() | st.integers(0, 1 << 20)


# -- safetensors --------------------------------------------------------------------------


@FUZZ
@given(edits=EDITS, cut=CUTS)
def test_safetensors_reader_on_mutated_files(seeds, tmp_path, edits, cut):
    path = tmp_path / "model.safetensors"
    # Mutations land in the header (the first few KB) far more often than in the data.
    header = struct.unpack("<Q", seeds["safetensors"][:8])[0] + 8
    path.write_bytes(mutate(seeds["safetensors"], [(p % header, v) for p, v in edits], cut))
    read_safetensors(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                        max_size=4),
    max_leaves=12)
ENTRIES = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "Q4", ""]) | JSON_VALUES,
     "shape": st.lists(st.integers(-2, 1 << 40), max_size=4) | JSON_VALUES,
     "data_offsets": st.lists(st.integers(-1, 1 << 41), min_size=0, max_size=3) | JSON_VALUES})


@FUZZ
@given(header=st.dictionaries(st.text(max_size=8), ENTRIES | JSON_VALUES, max_size=4),
       body=st.binary(max_size=256), declared=st.none() | st.integers(0, (1 << 64) - 1))
def test_safetensors_reader_on_generated_headers(tmp_path, header, body, declared):
    encoded = json.dumps(header).encode()
    length = len(encoded) if declared is None else declared
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + encoded + body)
    read_safetensors(path)


def _invalid_entry(draw_kind, size, bad):
    """A header entry that no reader may accept, of one of four kinds."""
    if draw_kind == "dtype":
        return {"dtype": bad, "shape": [size], "data_offsets": [0, 4 * size]}
    if draw_kind == "shape":
        return {"dtype": "F32", "shape": [size, -1 - size], "data_offsets": [0, 4 * size]}
    if draw_kind == "size":  # offsets that do not hold the shape
        return {"dtype": "F32", "shape": [size], "data_offsets": [0, 4 * size + 1 + size % 3]}
    return {"dtype": "F32", "shape": [size], "data_offsets": [1 << 40, (1 << 40) + 4 * size]}


@FUZZ
@given(kind=st.sampled_from(["dtype", "shape", "size", "beyond"]), size=st.integers(1, 64),
       bad=st.sampled_from(["Q4", "", "F33", "int8", "FP8"]),
       valid=st.integers(0, 3))
def test_safetensors_reader_refuses_invalid_headers(tmp_path, kind, size, bad, valid):
    """Acceptance, not just robustness: a header with one invalid entry among valid ones is
    refused with an InputError naming the file."""
    header, offset = {}, 0
    for index in range(valid):
        header[f"ok.{index}"] = {"dtype": "F32", "shape": [2], "data_offsets": [offset,
                                                                             offset + 8]}
        offset += 8
    header["bad"] = _invalid_entry(kind, size, bad)
    if kind != "beyond":
        begin, end = header["bad"]["data_offsets"]
        header["bad"]["data_offsets"] = [offset + begin, offset + end]
    encoded = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset + 8 * 64))
    with pytest.raises(InputError, match=r"model\.safetensors"):
        from fmc.artifacts.safetensors_reader import SafetensorsFile

        file = SafetensorsFile(path)
        for name in file.index():
            file.load(name)


# -- GGUF ---------------------------------------------------------------------------------


@FUZZ
@given(edits=EDITS, cut=CUTS)
def test_gguf_reader_on_mutated_files(seeds, tmp_path, edits, cut):
    path = tmp_path / "model.gguf"
    data = seeds["gguf"]
    # The header, metadata and tensor table take the first few KB.
    path.write_bytes(mutate(data, [(p % 8192, v) for p, v in edits], cut))
    read_gguf(path)


@FUZZ
@given(count=st.integers(0, (1 << 64) - 1), which=st.sampled_from([8, 16]))
def test_gguf_reader_refuses_absurd_counts_quickly(seeds, tmp_path, count, which):
    """The tensor count (offset 8) and metadata count (offset 16) claim up to 2⁶⁴ entries."""
    data = bytearray(seeds["gguf"])
    data[which:which + 8] = struct.pack("<Q", count)
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(data))
    read_gguf(path)


@FUZZ
@given(kind=st.sampled_from(["magic", "version", "cut"]), magic=st.binary(min_size=4, max_size=4),
       version=st.sampled_from([0, 1]) | st.integers(4, 0xFFFF), cut=st.floats(0, 1,
                                                                             exclude_max=True))
def test_gguf_reader_refuses_invalid_files(seeds, tmp_path, kind, magic, version, cut):
    """Acceptance, not just robustness: another magic, an unsupported version or a file cut
    anywhere is refused as an InputError (exit 4) naming the file."""
    data = bytearray(seeds["gguf"])
    if kind == "magic":
        data[:4] = magic if magic != b"GGUF" else b"GGUG"
    elif kind == "version":
        data[4:8] = struct.pack("<I", version)
    else:
        del data[int(cut * len(data)):]
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"^" + re.escape(str(path)) + ":") as refused:
        from fmc.frontend.gguf_file import open_gguf

        _, weights, _, _ = open_gguf(path)
        for name in weights.index():
            weights.load(name)
    assert refused.value.exit_code == 4


def _array_count_offsets(path: Path) -> dict[str, int]:
    """Byte offset of the element count of each metadata array, by element kind."""
    import gguf

    offsets = {}
    for field in gguf.GGUFReader(path).fields.values():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            kind = "string" if field.types[1] == gguf.GGUFValueType.STRING else "scalar"
            # key length (8) + key + value type (4) + element type (4)
            offsets.setdefault(kind, field.offset + 8 + len(field.name.encode()) + 8)
    return offsets


@pytest.mark.parametrize("kind", ["scalar", "string"])
@pytest.mark.parametrize("count", [1 << 20, 1 << 40, (1 << 64) - 1])
def test_gguf_reader_refuses_array_counts_past_the_end(seeds, tmp_path, kind, count):
    """gguf-py reads a scalar array element by element and takes a read past the end as an
    empty value: a count of 2⁴⁰ looped for hours (found by libFuzzer in CI)."""
    import signal

    path = tmp_path / "model.gguf"
    path.write_bytes(seeds["gguf"])
    offset = _array_count_offsets(path)[kind]
    # Cut as the libFuzzer seed is (tensors gone), at a whole int32 element of the array:
    # a read past the end then yields empty values instead of a numpy error.
    start = offset + 8
    data = bytearray(seeds["gguf"][:start + (16384 - start) // 4 * 4])
    data[offset:offset + 8] = struct.pack("<Q", count)
    path.write_bytes(bytes(data))

    class TooSlow(BaseException):  # not an OSError: the reader turns those into fmc errors
        pass

    def too_slow(*_):
        raise TooSlow("the GGUF reader did not refuse the count within 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        with pytest.raises(InputError, match=r"model\.gguf: not a readable GGUF file"):
            from fmc.frontend.gguf_file import open_gguf
            open_gguf(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_gguf_reader_refuses_deeply_nested_arrays(tmp_path):
    """Arrays of arrays recurse in gguf-py; nesting deeper than any real file is refused."""
    from fmc.frontend.gguf_file import open_gguf

    key = b"general.nested"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 0, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(InputError, match=r"nested\.gguf: not a readable GGUF file"):
        open_gguf(path)


# -- manifest.json ------------------------------------------------------------------------
MANIFEST_PATHS = ["format", "abi_version", "library", "library.file", "library.sha256",
                  "library.bytes", "weights", "weights.present", "weights.shards",
                  "weights.shards.0", "weights.shards.0.file", "weights.shards.0.bytes",
                  "params", "params.0", "params.0.shape", "params.0.shard", "params.0.dtype",
                  "runtime", "runtime.context_window", "runtime.page_size", "model",
                  "model.hidden_size", "model.eos_token_ids", "model.rms_norm_eps", "target",
                  "target.name", "target.spec", "quantization"]


def _set(document, dotted: str, value, delete: bool):
    parts = dotted.split(".")
    parent = document
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent.get(part)
        if parent is None:
            return
    key = int(parts[-1]) if isinstance(parent, list) else parts[-1]
    if isinstance(parent, list) and key >= len(parent):
        return
    if delete:
        parent.pop(key) if isinstance(parent, list) else parent.pop(key, None)
    else:
        parent[key] = value


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(MANIFEST_PATHS), JSON_VALUES, st.booleans()),
                        min_size=1, max_size=3))
def test_manifest_reader_on_mutated_manifests(seeds, tmp_path, changes):
    artifact = tmp_path / "artifact"
    if not artifact.exists():
        shutil.copytree(seeds["artifact"], artifact)
    manifest = json.loads((seeds["artifact"] / "manifest.json").read_text())
    for dotted, value, delete in changes:
        _set(manifest, dotted, value, delete)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    read_manifest_file(artifact)


# Fields the loader and `fmc verify` need: JSON path → (the name errors give it, its type).
REQUIRED_FIELDS = {
    "target.name": ("target.name", str), "library": ("library", dict),
    "library.file": ("library.file", str), "library.sha256": ("library.sha256", str),
    "library.bytes": ("library.bytes", int), "quantization": ("quantization", dict),
    "weights.present": ("weights.present", bool), "weights.shards": ("weights.shards", list),
    "weights.shards.0.file": ("weights.shards[0].file", str),
    "runtime.context_window": ("runtime.context_window", int),
    "runtime.page_size": ("runtime.page_size", int), "params": ("params", list),
    "params.0.name": ("params[0].name", str), "params.0.dtype": ("params[0].dtype", str),
    "params.0.shape": ("params[0].shape", list), "params.0.shard": ("params[0].shard", str),
    "model": ("model", dict)}


def _is_kind(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


@FUZZ
@given(field=st.sampled_from(sorted(REQUIRED_FIELDS)), delete=st.booleans(),
       value=JSON_VALUES)
def test_manifest_reader_refuses_a_missing_or_mistyped_field(seeds, tmp_path, field, delete,
                                                            value):
    """Acceptance: a manifest missing a field the loader needs, or holding a value of the
    wrong type there, is refused as an ArtifactError (exit 5) naming manifest.json and the
    field."""
    name, kind = REQUIRED_FIELDS[field]
    assume(delete or not _is_kind(value, kind))
    artifact = tmp_path / "artifact"
    if not artifact.exists():
        shutil.copytree(seeds["artifact"], artifact)
    manifest = json.loads((seeds["artifact"] / "manifest.json").read_text())
    _set(manifest, field, value, delete)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    from fmc.artifacts.manifest import read_manifest

    with pytest.raises(ArtifactError, match=r"manifest\.json: .*" + re.escape(name)) as refused:
        read_manifest(artifact)
    assert refused.value.exit_code == 5


@FUZZ
@given(data=st.binary(max_size=512))
def test_manifest_reader_on_arbitrary_bytes(tmp_path, data):
    from fmc.artifacts.manifest import read_manifest

    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path)


# -- fmc.toml -----------------------------------------------------------------------------
KEYS = ["model", "weights", "tokenizer", "target", "quant", "quants", "targets", "output",
        "output_dir", "context_window", "prefill_chunk", "shard_size", "quant_overrides",
        "disable_passes", "enable_passes", "bogus"]
TOML_VALUES = (st.integers(-5, 1 << 65) | st.booleans() | st.text(max_size=12)
               | st.lists(st.text(max_size=6) | st.integers(), max_size=3) | st.floats())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, float):
        if value != value:
            return "nan"
        return repr(value) if abs(value) != float("inf") else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)




@FUZZ
@given(tables=st.lists(st.tuples(
    st.sampled_from(["defaults", "build.a", "build.b", "matrix.m", "other", "build.x y"]),
    st.lists(st.tuples(st.sampled_from(KEYS), TOML_VALUES), max_size=4)), max_size=4))
def test_build_file_parser_on_generated_documents(tmp_path, tables):
    lines = []
    for name, entries in tables:
        lines.append(f"[{name}]" if " " not in name else f'["{name}"]')
        lines += [f"{key} = {_toml_value(value)}" for key, value in entries]
    path = tmp_path / "fmc.toml"
    path.write_text("\n".join(lines) + "\n")
    read_build_file(path)


# Values each key can never take (fmc.toml's types: docs/integration.md).
TEXT = st.text(alphabet="ab xy09-_.", max_size=6)
WRONG_VALUES = {
    "context_window": TEXT | st.booleans() | st.floats() | st.integers(-5, 0)
    | st.lists(st.integers(), max_size=2),
    "model": st.integers() | st.booleans() | st.lists(TEXT, max_size=2)
    | st.sampled_from(["", "  "]),
    "quant_overrides": TEXT | st.integers() | st.lists(st.integers(), min_size=1, max_size=2)
    | st.just([""]),
}


@FUZZ
@given(section=st.sampled_from(["defaults", "build.a", "matrix.m"]), data=st.data(),
       unknown=st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True) | st.none())
def test_build_file_parser_refuses_unknown_keys_and_wrong_values(tmp_path, section, data,
                                                                 unknown):
    """Acceptance: one unknown key (a made-up `x_…` name) or one known key with a value of
    the wrong type, in an otherwise valid fmc.toml, is refused as an InputError (exit 4)
    naming the file, the line and the key."""
    if unknown is None:
        key = data.draw(st.sampled_from(sorted(WRONG_VALUES)))
        entry = f"{key} = {_toml_value(data.draw(WRONG_VALUES[key]))}"
    else:
        key = f"x_{unknown}"
        entry = f"{key} = 1"
    tables = {"defaults": {"target": '"cpu"'}, "build.a": {"model": '"m"'},
              "matrix.m": {"model": '"m"', "quants": '["q0f32"]'}}
    tables[section][key] = None  # replaces a valid entry of the same key
    lines = []
    for name, entries in tables.items():
        lines.append(f"[{name}]")
        lines += [entry if value is None else f"{k} = {value}" for k, value in entries.items()]
    path = tmp_path / "fmc.toml"
    path.write_text("\n".join(lines) + "\n")
    line = lines.index(entry) + 1
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:{line}: .*{key}") as refused:
        from fmc.project.config import load

        load(path)
    assert refused.value.exit_code == 4


def _toml_inline(value) -> str:
    """Any nesting of tables and lists as TOML inline values (parses to the same structure
    as [table] and [[array]] headers would)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_inline(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    return _toml_value(value)


# fmc's own keys holding values of every kind and nesting: a table where a list or a
# string belongs, a list of tables where a table belongs ([[build]]), and so on.
TOML_SHAPES = st.recursive(
    st.integers(-5, 10) | st.booleans() | st.text(max_size=6) | st.floats(),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from([*KEYS, "a", "b"]), inner, max_size=3),
    max_leaves=10)


@FUZZ
@given(document=st.dictionaries(st.sampled_from(["defaults", "build", "matrix", "other"]),
                                TOML_SHAPES, max_size=3))
def test_build_file_parser_on_structurally_wrong_documents(tmp_path, document):
    path = tmp_path / "fmc.toml"
    path.write_text("".join(f"{key} = {_toml_inline(value)}\n"
                            for key, value in document.items()))
    read_build_file(path)


@FUZZ
@given(edits=EDITS, cut=CUTS)
def test_build_file_parser_on_mutated_files(seeds, tmp_path, edits, cut):
    path = tmp_path / "fmc.toml"
    path.write_bytes(mutate(seeds["toml"], edits, cut))
    try:
        read_build_file(path)
    except UnicodeDecodeError:
        pytest.fail("a non-UTF-8 fmc.toml must be an fmc error")


# -- libFuzzer through atheris -----------------------------------------------------------
@pytest.mark.parametrize("target", ["safetensors", "gguf", "manifest", "toml"])
def test_atheris_fuzz_targets(target, seeds, tmp_path):
    """libFuzzer (coverage-guided) for a bounded time per reader, seeded with the valid
    file; a crash is any exception other than fmc's errors (libFuzzer exits non-zero and
    prints the input)."""
    import atheris  # noqa: F401  (a test dependency: a missing one fails, never skips)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed = {"safetensors": seeds["safetensors"], "gguf": seeds["gguf"][:16384],
            "manifest": (seeds["artifact"] / "manifest.json").read_bytes(),
            "toml": seeds["toml"]}[target]
    (corpus / "seed").write_bytes(seed)
    run = subprocess.run([sys.executable, str(FUZZ_TARGETS), target, str(corpus),
                          "-max_total_time=5", "-seed=1", "-rss_limit_mb=4096", "-timeout=10",
                          f"-artifact_prefix={tmp_path}/"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr or "DONE" in run.stderr, run.stderr[-2000:]
