"""The catalogue of bad inputs (docs/errors.md): each case's exit code and one-line message.

Every case runs the real command line in-process (`fmc --quiet …`) and checks: the exit
code, that stderr is exactly one line `fmc: error: …` naming the file, tensor or key, and
that no traceback is printed. The documentation's table must list exactly these cases with
the same exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fmc.cli import main
from fmc.frontend.archs.registry import model_types

MODEL_TYPES = model_types()  # every registered family's (the message lists them)

DOC = Path(__file__).parent.parent / "docs" / "errors.md"
MODEL = "llama-gqa-untied"
DOWN = "model.layers.0.mlp.down_proj.weight"


@dataclass(frozen=True)
class Case:
    id: str
    code: int
    expect: str  # regular expression the one-line message must contain
    make: Callable[[Path, Path, Path], list[str]]  # (tmp, checkpoint copy, artifact) → argv


def _config(checkpoint: Path, **changes) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _tensors(checkpoint: Path, change: Callable[[dict], None]) -> None:
    from safetensors.numpy import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _bytes(checkpoint: Path, change: Callable[[bytes], bytes]) -> None:
    path = checkpoint / "model.safetensors"
    path.write_bytes(change(path.read_bytes()))


def _header(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def _with_header(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def _huge_tensor(data: bytes) -> bytes:
    header, body = _header(data)
    entry = header["model.embed_tokens.weight"]
    entry["shape"] = [1 << 18, 1 << 20]  # 1 TiB of float32
    entry["data_offsets"][1] = entry["data_offsets"][0] + (1 << 40)
    return _with_header(header, body)


def _sharded_without_a_shard(checkpoint: Path) -> None:
    header, _ = _header((checkpoint / "model.safetensors").read_bytes())
    index = {"metadata": {}, "weight_map": {
        name: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
        for i, name in enumerate(n for n in header if n != "__metadata__")}}
    shutil.move(checkpoint / "model.safetensors", checkpoint / "model-00001-of-00002.safetensors")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))


def _gguf(tmp: Path, checkpoint: Path, quant_types: dict | None = None) -> Path:
    from models import write_gguf_from_checkpoint

    return write_gguf_from_checkpoint(checkpoint, tmp / "model.gguf", quant_types)


def _gguf_with_q8_1(tmp: Path, checkpoint: Path) -> Path:
    """A GGUF whose down projection is stored as Q8_1 (a type gguf-py cannot dequantize)."""
    import gguf
    from models import write_gguf_from_checkpoint

    original = gguf.quants.quantize

    def fake_quantize(array, qtype):
        if qtype == gguf.GGMLQuantizationType.Q8_1:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            return np.zeros((array.shape[0], array.shape[1] // block * size), np.uint8)
        return original(array, qtype)

    gguf.quants.quantize = fake_quantize
    try:
        return write_gguf_from_checkpoint(checkpoint, tmp / "q8_1.gguf",
                                          {"blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q8_1})
    finally:
        gguf.quants.quantize = original


def _gguf_with(tmp: Path, checkpoint: Path, tensor: str, type_name: str) -> Path:
    """The checkpoint as GGUF with one tensor stored in `type_name` (random valid blocks)."""
    import gguf
    from models import write_gguf_from_checkpoint

    return write_gguf_from_checkpoint(checkpoint, tmp / "typed.gguf",
                                      {tensor: gguf.GGMLQuantizationType[type_name]})


def _artifact_copy(tmp: Path, artifact: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp / "artifact"))


def _edit_manifest(artifact: Path, change: Callable[[dict], None]) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _compile(checkpoint: Path | str, tmp: Path, *extra: str) -> list[str]:
    return ["compile", str(checkpoint), "-o", str(tmp / "out"), *extra]


def _fuse_qkv_short(tensors: dict) -> None:
    parts = [tensors.pop(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = np.concatenate(parts)[:-1]


def _nan(tensors: dict) -> None:
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(artifact: Path, *extra: str) -> list[str]:
    return ["run", str(artifact), "--prompt", "w5 w6", "--max-tokens", "2", *extra]


CASES = [
    # -- config ------------------------------------------------------------------------------
    Case("config-not-json", 4, r"config\.json: not valid JSON",
         lambda t, c, a: ((c / "config.json").write_text("{"), _compile(c, t))[1]),
    Case("config-missing-key", 4, r"config\.json: .*'hidden_size' is missing",
         lambda t, c, a: (_config(c, hidden_size=None), _compile(c, t))[1]),
    Case("config-wrong-type", 4, r"config\.json: .*'num_attention_heads' must be an integer",
         lambda t, c, a: (_config(c, num_attention_heads="4"), _compile(c, t))[1]),
    Case("config-unknown-model-type", 4, r"config\.json: .*model_type 'gpt_neox' is not "
         rf"supported; supported: {', '.join(MODEL_TYPES)}$",
         lambda t, c, a: (_config(c, model_type="gpt_neox"), _compile(c, t))[1]),
    Case("config-heads-do-not-divide", 4, r"config\.json: .*hidden_size \(66\) is not a "
         r"multiple of num_attention_heads \(4\)",
         lambda t, c, a: (_config(c, hidden_size=66, head_dim=None), _compile(c, t))[1]),
    Case("config-kv-heads-do-not-divide", 4, r"config\.json: .*num_attention_heads \(4\) is "
         r"not a multiple of num_key_value_heads \(3\)",
         lambda t, c, a: (_config(c, num_key_value_heads=3), _compile(c, t))[1]),
    Case("weights-wrong-shape", 4, rf"model\.safetensors: tensor '{DOWN}' has shape \[64, 95\], "
         r"expected \[64, 96\]",
         lambda t, c, a: (_tensors(c, lambda w: w.__setitem__(
             DOWN, np.zeros((64, 95), np.float32))), _compile(c, t))[1]),
    Case("weights-missing-tensor", 4, r"model\.safetensors: tensor "
         r"'model\.layers\.1\.self_attn\.o_proj\.weight' is missing",
         lambda t, c, a: (_tensors(c, lambda w: w.pop(
             "model.layers.1.self_attn.o_proj.weight")), _compile(c, t))[1]),
    # phi3: a fused qkv_proj whose rows disagree with the config (one row of v missing)
    Case("weights-fused-rows", 4, r"model\.safetensors: tensor "
         r"'model\.layers\.0\.self_attn\.qkv_proj\.weight' has shape \[127, 64\]; the "
         r"config makes self_attn\.qkv_proj 128 rows \(q_proj 64 \+ k_proj 32 \+ v_proj 32\)",
         lambda t, c, a: (_config(c, model_type="phi3"), _tensors(c, _fuse_qkv_short),
                          _compile(c, t))[2]),
    # mixture of experts (a llama checkpoint's config turned into a MoE family's)
    Case("config-moe-dense-layers", 4, r"config\.json: 'mlp_only_layers' \(dense layers "
         r"among the experts\) is not supported for qwen3_moe",
         lambda t, c, a: (_config(c, model_type="qwen3_moe", moe_intermediate_size=96,
                                  num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
                          _compile(c, t))[1]),
    Case("weights-missing-expert", 4, r"model\.safetensors: tensor "
         r"'model\.layers\.0\.block_sparse_moe\.experts\.1\.w1\.weight' is missing",
         lambda t, c, a: (_config(c, model_type="mixtral", num_local_experts=3,
                                  num_experts_per_tok=2),
                          _tensors(c, lambda w: w.update({
                              f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight":
                              np.zeros((96, 64), np.float32) for e in (0, 2)})),
                          _compile(c, t))[2]),
    Case("calib-moe", 2, r"--calib is not supported for mixture-of-experts models",
         lambda t, c, a: (_config(c, model_type="mixtral", num_local_experts=4,
                                  num_experts_per_tok=2),
                          (t / "x.txt").write_text("w1 w2 w3"),
                          _compile(c, t, "--quant", "q4f16", "--calib", str(t / "x.txt")))[2]),
    # -- files -------------------------------------------------------------------------------
    Case("safetensors-truncated-header", 4, r"model\.safetensors: not a safetensors file",
         lambda t, c, a: (_bytes(c, lambda d: d[:5]), _compile(c, t))[1]),
    Case("safetensors-corrupt-header", 4, r"model\.safetensors: corrupt safetensors header",
         lambda t, c, a: (_bytes(c, lambda d: d[:8] + b"{" * (len(d) - 8)), _compile(c, t))[1]),
    Case("safetensors-truncated-data", 4, r"model\.safetensors: tensor '[\w.]+': data ends at "
         r"byte \d+ but the file holds \d+",
         lambda t, c, a: (_bytes(c, lambda d: d[:-1000]), _compile(c, t))[1]),
    Case("safetensors-huge-tensor", 4, r"model\.safetensors: tensor 'model\.embed_tokens"
         r"\.weight': data ends at byte 1099",
         lambda t, c, a: (_bytes(c, _huge_tensor), _compile(c, t))[1]),
    Case("index-missing-shard", 4, r"model-00002-of-00002\.safetensors",
         lambda t, c, a: (_sharded_without_a_shard(c), _compile(c, t))[1]),
    Case("gguf-truncated", 4, r"model\.gguf: not a readable GGUF file \(truncated or corrupt",
         lambda t, c, a: _compile(_truncated(_gguf(t, c)), t)),
    Case("gguf-unsupported-type", 4, r"q8_1\.gguf: tensor 'blk\.0\.ffn_down\.weight' has GGUF "
         r"type Q8_1",
         lambda t, c, a: _compile(_gguf_with_q8_1(t, c), t)),
    Case("weights-nonfinite", 4, r"model\.safetensors: tensor "
         r"'model\.layers\.1\.mlp\.up_proj\.weight' holds 1 NaN/Inf value\(s\) \(pass "
         r"--allow-nonfinite",
         lambda t, c, a: (_tensors(c, _nan), _compile(c, t))[1]),
    # -- options -----------------------------------------------------------------------------
    Case("unknown-quant", 2, r"unknown quantization scheme 'q4f17' \(did you mean 'q4f16'\?\); "
         r"choose one of: .*q4f16",
         lambda t, c, a: _compile(c, t, "--quant", "q4f17")),
    Case("unknown-target", 2, r"unknown target 'cdua' \(did you mean 'cuda'\?\)",
         lambda t, c, a: _compile(c, t, "--target", "cdua")),
    Case("tensor-parallel-does-not-divide", 2, r"--tensor-parallel 3 does not divide "
         r"num_attention_heads \(4\)",
         lambda t, c, a: _compile(c, t, "--tensor-parallel", "3")),
    Case("group-size-does-not-divide", 4, r"tensor 'model\.[\w.]+\.weight': reduction "
         r"dimension 80 is not a multiple of q4f16's group size 32",
         lambda t, c, a: (_config(c, intermediate_size=80), _tensors(c, _resize_mlp(80)),
                          _compile(c, t, "--quant", "q4f16"))[2]),
    Case("quant-recipe-invalid", 4, r"recipe\.toml: unknown quantization scheme 'q9'",
         lambda t, c, a: ((t / "recipe.toml").write_text('default = "q9"\n'),
                          _compile(c, t, "--quant-recipe", str(t / "recipe.toml")))[1]),
    Case("quant-recipe-bad-layers", 4, r"recipe\.toml: rule 1: layers = 'i \*\* 2' is not a "
         r"layer expression",
         lambda t, c, a: ((t / "recipe.toml").write_text(
             'default = "q4f16"\n[[rule]]\nmatch = "mlp.*"\nlayers = "i ** 2"\nscheme = '
             '"q8f16"\n'), _compile(c, t, "--quant-recipe", str(t / "recipe.toml")))[1]),
    Case("quant-gguf-not-gguf", 2, r"--quant gguf keeps a GGUF input's own types; .* is not a "
         r"GGUF file", lambda t, c, a: _compile(c, t, "--quant", "gguf")),
    Case("gguf-type-without-scheme", 4, r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight': "
         r"GGUF type IQ4_NL has no fmc scheme to keep it in \(--quant gguf\); choose one "
         r"with --quant-override",
         lambda t, c, a: _compile(_gguf_with(t, c, "blk.0.ffn_down.weight", "IQ4_NL"), t)),
    Case("tokenizer-not-json", 4, r"checkpoint/tokenizer\.json: not a Hugging Face tokenizer \(",
         lambda t, c, a: ((c / "tokenizer.json").write_text('{"a": 1'), _compile(c, t))[1]),
    Case("tokenizer-config-not-an-object", 4, r"checkpoint/tokenizer_config\.json: must be a "
         r"JSON object, got list",
         lambda t, c, a: ((c / "tokenizer_config.json").write_text("[]"), _compile(c, t))[1]),
    Case("chat-template-does-not-parse", 4, r"checkpoint/tokenizer_config\.json: chat_template "
         r"does not parse \(",
         lambda t, c, a: ((c / "tokenizer_config.json").write_text(
             json.dumps({"chat_template": "{% for m in messages %}"})), _compile(c, t))[1]),
    Case("calib-unreadable", 4, r"nope\.txt: cannot read the calibration text",
         lambda t, c, a: _compile(c, t, "--quant", "q4f16", "--calib", str(t / "nope.txt"))),
    Case("output-exists", 6, r"out: already exists \(pass --force",
         lambda t, c, a: ((t / "out").mkdir(), _compile(c, t))[1]),
    Case("output-not-writable", 6, r"blocker: is a file, so .*out cannot be created under it",
         lambda t, c, a: ((t / "blocker").write_text("a file"),
                          ["compile", str(c), "-o", str(t / "blocker" / "out")])[1]),
    Case("missing-toolchain", 3, r"glslc not found on PATH \(needed for compiling the "
         r"generated GLSL kernels to SPIR-V\); install it: apt-get install glslc",
         lambda t, c, a: _compile(c, t, "--target", "vulkan")),
    # -- artifacts and runtime ---------------------------------------------------------------
    Case("artifact-not-a-directory", 5, r"nothing: not an artifact directory",
         lambda t, c, a: _run(t / "nothing")),
    Case("artifact-manifest-corrupt", 5, r"manifest\.json: corrupt \(",
         lambda t, c, a: ((_artifact_copy(t, a) / "manifest.json").write_text("{"),
                          _run(t / "artifact"))[1]),
    Case("artifact-shard-missing", 5, r"params/shard-00000\.safetensors: missing",
         lambda t, c, a: ((_artifact_copy(t, a) / "params/shard-00000.safetensors").unlink(),
                          _run(t / "artifact"))[1]),
    Case("artifact-shard-altered", 5, r"params/shard-00000\.safetensors: sha256 mismatch",
         lambda t, c, a: (_flip_last_byte(_artifact_copy(t, a) /
                                          "params/shard-00000.safetensors"),
                          _run(t / "artifact"))[1]),
    Case("artifact-tokenizer-corrupt", 5, r"tokenizer/tokenizer\.json: corrupt \(.*\); "
         r"recompile the artifact",
         lambda t, c, a: ((_artifact_copy(t, a) / "tokenizer/tokenizer.json").write_text("{"),
                          _run(t / "artifact", "--no-verify"))[1]),
    Case("artifact-abi-newer", 5, r"manifest\.json: ABI version 999 is newer than this fmc "
         r"supports \(1\); upgrade fmc",
         lambda t, c, a: (_edit_manifest(_artifact_copy(t, a),
                                         lambda m: m.__setitem__("abi_version", 999)),
                          _run(t / "artifact"))[1]),
    Case("prompt-too-long", 2, r"the prompt is 300 tokens; the context window holds 256",
         lambda t, c, a: ["run", str(a), "--prompt", " ".join(["w5"] * 300)]),
    # -- devices (a Vulkan artifact: `a` is VULKAN_ARTIFACT for these) ---------------------
    Case("vulkan-no-loader", 7, r"no Vulkan loader \(libvulkan-missing\.so\.1\) on this "
         r"machine; install it \(apt-get install libvulkan1\)", lambda t, c, a: _run(a)),
    Case("vulkan-runtime-unbuildable", 3, r"g\+\+ not found on PATH \(needed to build fmc's "
         r"Vulkan runtime\); install it: apt-get install g\+\+ libvulkan-dev",
         lambda t, c, a: _run(a)),
    Case("vulkan-no-device", 7, r"no Vulkan device: vkCreateInstance failed \(VkResult -9\): "
         r"no Vulkan driver \(ICD\) found; install a Vulkan 1\.2 driver",
         lambda t, c, a: _run(a)),
]
VULKAN_ARTIFACT = ("llama-quant", "q4f16", "vulkan")  # shared with test_vulkan_runtime.py


def _in_a_fresh_process(argv: list[str], **env: str) -> tuple[int, str, str]:
    """The CLI in a new process: what a Vulkan driver list read once per process needs."""
    code = "import sys; from fmc.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "--quiet", *argv], capture_output=True,
                          text=True, env={**os.environ, **env})
    return done.returncode, done.stdout, done.stderr


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])
    return path


def _resize_mlp(size: int) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        for name in list(tensors):
            if name.endswith(("gate_proj.weight", "up_proj.weight")):
                tensors[name] = np.ascontiguousarray(tensors[name][:size])
            elif name.endswith("down_proj.weight"):
                tensors[name] = np.ascontiguousarray(tensors[name][:, :size])
    return change


@pytest.fixture
def inputs(tiny_checkpoint, tiny_artifact, tmp_path, monkeypatch):
    checkpoint = Path(shutil.copytree(tiny_checkpoint(MODEL), tmp_path / "checkpoint"))
    empty = tmp_path / "empty-path"
    empty.mkdir()
    return tmp_path, checkpoint, tiny_artifact(MODEL), monkeypatch, empty


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_its_exit_code(case, inputs, capsys, request):
    tmp, checkpoint, artifact, monkeypatch, empty = inputs
    if case.id.startswith("vulkan-"):
        artifact = request.getfixturevalue("tiny_artifact")(*VULKAN_ARTIFACT)
    argv = case.make(tmp, checkpoint, artifact)
    if case.id == "missing-toolchain":
        monkeypatch.setenv("PATH", str(empty))
    if case.id == "vulkan-no-loader":
        monkeypatch.setattr("fmc.devices.vulkan_runtime.VULKAN_LOADER", "libvulkan-missing.so.1")
    capsys.readouterr()
    if case.id == "vulkan-no-device":  # a driver list that names no driver
        code, out, err = _in_a_fresh_process(argv, VK_ICD_FILENAMES=str(tmp / "none.json"))
    elif case.id == "vulkan-runtime-unbuildable":  # no runtime built yet, no compiler
        code, out, err = _in_a_fresh_process(argv, FMC_CACHE_DIR=str(tmp / "cache"),
                                             PATH=str(empty))
    else:
        code = main(["--quiet", *argv])
        out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("fmc: error: "), err
    assert re.search(case.expect, lines[0]), lines[0]
    assert "Traceback" not in err and not out.strip()
    assert not (tmp / "out").exists() or case.id == "output-exists"


def test_an_extra_tensor_is_a_warning_naming_it(inputs, capsys):
    tmp, checkpoint, *_ = inputs
    _tensors(checkpoint, lambda w: w.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    assert main(_compile(checkpoint, tmp)) == 0
    err = capsys.readouterr().err
    assert re.search(r"WARNING: ignoring 1 checkpoint tensor\(s\) the model does not use: "
                     r"model\.extra\.weight", err)


def test_allow_nonfinite_compiles_a_nan_weight(inputs, capsys):
    tmp, checkpoint, *_ = inputs
    _tensors(checkpoint, _nan)
    assert main(["--quiet", *_compile(checkpoint, tmp, "--allow-nonfinite")]) == 0
    assert (tmp / "out" / "manifest.json").is_file()


def test_debug_shows_the_traceback(inputs, capsys):
    tmp, checkpoint, *_ = inputs
    from fmc.errors import InputError

    _config(checkpoint, hidden_size=None)
    with pytest.raises(InputError, match="'hidden_size' is missing"):
        main(["--debug", *_compile(checkpoint, tmp)])


def _documented() -> dict[str, int]:
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|[^|]*\| (\d+) \|", DOC.read_text(), re.MULTILINE)
    return {case: int(code) for case, code in rows}


def test_docs_list_every_case_with_its_exit_code():
    documented = _documented()
    tested = {c.id: c.code for c in CASES} | {"weights-extra-tensor": 0,
                                               "weights-nonfinite-allowed": 0}
    assert documented == tested
