"""The CPU's integer-dot matmuls (--cpu-dot int8): each kernel equals a numpy model of the
same integer arithmetic, VNNI is in the code exactly when the CPU has it, and an int8
artifact's logits stay within the documented tolerance of the float path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import fmc
from fmc.compiler import CompileOptions, compile_model
from fmc.errors import UsageError
from fmc.lowering.kernels.int8_dot_cpu import GROUP, integer_dot
from fmc.lowering.passes.cpu_int8_dot import SCHEMES as SCHEMES_WITH_KERNELS
from fmc.quant import get
from fmc.targets import get as get_target

VNNI_CPU, PLAIN_AVX512_CPU = "icelake-server", "skylake-avx512"
# Every scheme with an integer-dot kernel, and the reduction length its blocks need.
SCHEMES = sorted(SCHEMES_WITH_KERNELS)
SUPER_BLOCK_SCHEMES = ("q4k", "q5k", "q6k")


def group_operands(scheme: str, weight: np.ndarray):
    """(codes [n, k], scale [n, k/sub], minimum [n, k/sub] or None, zero or None, sub) of the
    scheme's quantized weight, value = (code − zero)·scale or code·scale + minimum, from the
    reference quantizer's arrays through the packing helpers (not the kernel's code)."""
    from fmc.quant.kquant import from_words, unpack_scales
    from fmc.quant.packing import join_five_bit, unpack_fields, unpack_nibbles

    stored = get(scheme).quantize(weight)
    n = weight.shape[0]
    if scheme in ("q4k", "q5k"):
        # codes (and q5k's 5th bits), the three packed-scale word arrays, d, dmin
        codes = unpack_nibbles(stored[0]) if scheme == "q4k" else join_five_bit(*stored[:2])
        words, (d, dmin) = stored[-5:-2], stored[-2:]
        sc, m = unpack_scales(from_words(words).reshape(n, -1, 12))
        scale = d.astype(np.float32)[..., None] * sc.astype(np.float32)
        minimum = -(dmin.astype(np.float32)[..., None] * m.astype(np.float32))
        return codes, scale.reshape(n, -1), minimum.reshape(n, -1), None, 32
    if scheme == "q6k":
        low, high, sc, d = stored
        codes = unpack_nibbles(low) | (unpack_fields(high, 2) << 4)
        scale = d.astype(np.float32)[..., None] * sc.reshape(n, d.shape[1], -1).astype(
            np.float32)
        return codes, scale.reshape(n, -1), None, 32, 16
    if scheme == "q8f16":  # the kernel reads the signed code c as the byte c + 128
        return stored[0].astype(np.int64) + 128, stored[1], None, 128, 32
    if scheme in ("q5_0", "q5_1"):
        codes, rest = join_five_bit(*stored[:2]), stored[2:]
    else:
        codes, rest = unpack_nibbles(stored[0]), stored[1:]
    zero = {"q4f16": 7, "q4f32": 7, "q4_0": 8, "q5_0": 16}.get(scheme)
    return codes, rest[0], rest[1] if len(rest) == 2 else None, zero, 32


def integer_model(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None,
                  zero: int | None, sub: int, x: np.ndarray):
    """numpy: x → int8 per block of 32 (amax/127, round half to even: the kernel's T.round
    is LLVM's nearbyint, as llama.cpp's AVX path rounds), exact integer
    dot products per scale sub-block, then the float scales — the kernel's arithmetic,
    written independently of it."""
    blocks = x.reshape(-1, GROUP).astype(np.float32)
    amax = np.abs(blocks).max(-1)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(
        np.float32)
    scaled = blocks * inverse[:, None]
    xq = np.rint(scaled).astype(np.int64).reshape(-1, sub)
    xd = np.repeat((amax * np.float32(1 / 127)).astype(np.float32), GROUP // sub)
    dots = (codes.reshape(codes.shape[0], -1, sub).astype(np.int64) * xq).sum(-1)
    if zero is None:  # value = c·s + m
        terms = dots.astype(np.float32) * (scales.astype(np.float32) * xd) + \
            (mins.astype(np.float32) * xd) * xq.sum(-1).astype(np.float32)
    else:
        centred = dots - zero * xq.sum(-1)  # exact integers [n, sub-blocks]
        terms = centred.astype(np.float32) * (scales.astype(np.float32) * xd)
    return terms.sum(-1, dtype=np.float64).astype(np.float32)


def kernel_for(scheme: str, n: int, k: int, stored, residual: bool, tokens: str = "one"):
    """The integer-dot kernel the pass would choose for this scheme's stored arrays."""
    fmt = SCHEMES_WITH_KERNELS[scheme]
    if fmt.scales.startswith("group"):
        fmt = dataclasses.replace(fmt, scale_dtype=str(stored[1 + (fmt.high_bits > 0)].dtype))
    assert [(a.shape, str(a.dtype)) for a in stored] == fmt.arrays(n, k)
    return integer_dot(n, k, fmt, residual, tokens)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n, k", [(48, 64), (64, 576)])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_equals_the_integer_model(scheme, n, k, residual):
    import tvm

    if scheme in SUPER_BLOCK_SCHEMES:  # super-blocks of 256
        k = 4 * k
    stored_scheme = get(f"{scheme}_rows16")
    rng = np.random.default_rng(n + k)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    stored = stored_scheme.quantize(weight)
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    res = rng.standard_normal((1, 1, n)).astype(np.float32)
    func = kernel_for(scheme, n, k, stored, residual)
    target = get_target(f"cpu:{VNNI_CPU}").tvm_target()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=target)
    assembly = lib.mod.inspect_source("asm")
    if "vpdpbusd" not in assembly:
        pytest.fail("no VNNI instruction in the integer-dot kernel")
    if scheme == "q8f16" and "vpermb" not in assembly:
        pytest.fail("the 8-bit kernel's byte transpose is not one vpermb")
    if not get_target("cpu").has_vnni():
        pytest.skip("this CPU cannot run VNNI code (the assembly was checked)")
    out = tvm.runtime.tensor(np.zeros((1, 1, n), np.float32))
    args = [*stored, x, *([res] if residual else [])]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    expected = integer_model(*group_operands(scheme, weight), x[0, 0])
    if residual:
        expected = expected + res[0, 0]
    # Integer sums are exact; only the float accumulation order of the groups differs.
    np.testing.assert_allclose(out.numpy()[0, 0], expected, rtol=2e-6,
                               atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("scheme", ["q4f16", "q4_1", "q8f16", "q4k", "q5_0", "q6k"])
@pytest.mark.parametrize("tokens, shape", [("seq", (1, 7)), ("batch", (5, 1))])
def test_many_token_kernel_equals_the_integer_model_per_token(scheme, tokens, shape):
    """Prefill ([1, T, K]: tiles of 4 tokens and a tail) and batched decode ([B, 1, K])."""
    import tvm

    n, k = 32, 512
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    stored = get(f"{scheme}_rows16").quantize(weight)
    x = rng.standard_normal((*shape, k)).astype(np.float32)
    res = rng.standard_normal((*shape, n)).astype(np.float32)
    func = kernel_for(scheme, n, k, stored, True, tokens)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=get_target(f"cpu:{VNNI_CPU}").tvm_target())
    if not get_target("cpu").has_vnni():
        pytest.skip("this CPU cannot run VNNI code")
    out = tvm.runtime.tensor(np.zeros((*shape, n), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in [*stored, x, res]], out)
    operands = group_operands(scheme, weight)
    rows = x.reshape(-1, k)
    expected = np.stack([integer_model(*operands, row) for row in rows])
    expected = expected + res.reshape(-1, n)
    np.testing.assert_allclose(out.numpy().reshape(-1, n), expected, rtol=2e-6,
                               atol=2e-6 * np.abs(expected).max())


EXPERTS_N_K = 3, 48, 512  # a stack of experts for the MoE kernels' tests


def stacked_kernel(scheme: str, tokens: str, rng):
    """A random expert stack [E, n, k] quantized in `scheme` row-interleaved, its stored
    arrays, the integer-dot kernel for `tokens` compiled for a VNNI CPU, and each expert's
    operands for `integer_model`."""
    import tvm

    from fmc.quant import experts

    num_experts, n, k = EXPERTS_N_K
    weight = rng.standard_normal((num_experts, n, k)).astype(np.float32)
    stored = experts.split(get(f"{scheme}_rows16").quantize(experts.flatten(weight)),
                           num_experts)
    fmt = SCHEMES_WITH_KERNELS[scheme]
    if fmt.scales.startswith("group"):
        fmt = dataclasses.replace(fmt, scale_dtype=str(stored[1 + (fmt.high_bits > 0)].dtype))
    func = integer_dot(n, k, fmt, False, tokens, experts=num_experts)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=get_target(f"cpu:{VNNI_CPU}").tvm_target())
    return stored, lib, [group_operands(scheme, w) for w in weight]


@pytest.mark.parametrize("scheme", ["q4f16", "q4_1", "q8f16", "q4k", "q5_0", "q6k"])
def test_grouped_kernel_equals_the_integer_model_per_row(scheme):
    """The grouped expert GEMM (fmc.nn_moe): blocks of GROUP_ROWS rows, each against its
    expert's weight from a stack [E, …]; a block marked EMPTY_BLOCK is skipped and zeroed."""
    import tvm

    from fmc.nn_moe import EMPTY_BLOCK, GROUP_ROWS

    _, n, k = EXPERTS_N_K
    rng = np.random.default_rng(11)
    stored, lib, operands = stacked_kernel(scheme, "grouped", rng)
    chosen = np.array([2, 0, 2, EMPTY_BLOCK, 1], np.int32)
    x = rng.standard_normal((len(chosen) * GROUP_ROWS, k)).astype(np.float32)
    if not get_target("cpu").has_vnni():
        pytest.skip("this CPU cannot run VNNI code")
    out = tvm.runtime.tensor(np.full((len(chosen), GROUP_ROWS, n), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in [*stored, x, chosen]], out)
    expected = np.stack([
        np.zeros(n, np.float32) if chosen[r // GROUP_ROWS] == EMPTY_BLOCK
        else integer_model(*operands[chosen[r // GROUP_ROWS]], row) for r, row in enumerate(x)])
    np.testing.assert_allclose(out.numpy().reshape(-1, n), expected, rtol=2e-6,
                               atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("scheme", ["q4f16", "q4_1", "q8f16", "q4k", "q5_0", "q6k"])
@pytest.mark.parametrize("tokens", ["gathered", "slots"])
def test_gathered_kernel_equals_the_integer_model_per_slot(scheme, tokens):
    """MoE decode's gathered GEMVs: each token's activations ("gathered": gate, up) or each
    slot's ("slots": down) against each of its chosen experts' weights from a stack [E, …];
    output [tokens, slots, n]."""
    import tvm

    _, n, k = EXPERTS_N_K
    slots = 2
    rng = np.random.default_rng(13)
    stored, lib, operands = stacked_kernel(scheme, tokens, rng)
    chosen = np.array([[2, 0], [1, 2], [0, 1]], np.int32)
    x = rng.standard_normal((len(chosen), *([slots] if tokens == "slots" else []), k)
                            ).astype(np.float32)
    if not get_target("cpu").has_vnni():
        pytest.skip("this CPU cannot run VNNI code")
    out = tvm.runtime.tensor(np.full((len(chosen), slots, n), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in [*stored, x, chosen]], out)
    rows = x if tokens == "slots" else x[:, None].repeat(slots, 1)
    expected = np.array([[integer_model(*operands[e], rows[t, j]) for j, e in enumerate(chosen[t])]
                         for t in range(len(chosen))])
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-6,
                               atol=2e-6 * np.abs(expected).max())


def test_vnni_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv("FMC_CPU_DOT")
    vnni = get_target(f"cpu:{VNNI_CPU}")
    assert vnni.has_vnni()
    vnni.configure_dot(None)
    assert vnni.dot == "int8" and vnni.kernel_passes()
    monkeypatch.setenv("FMC_CPU_DOT", "float")
    vnni.configure_dot(None)
    assert vnni.dot == "float"
    monkeypatch.setenv("FMC_CPU_DOT", "fast")
    with pytest.raises(UsageError, match="FMC_CPU_DOT 'fast': choose one of float, int8"):
        vnni.configure_dot(None)
    monkeypatch.delenv("FMC_CPU_DOT")
    plain = get_target(f"cpu:{PLAIN_AVX512_CPU}")
    assert not plain.has_vnni()
    assert not get_target("cpu:cascadelake").has_vnni()  # VNNI, but no VBMI byte permutes
    plain.configure_dot(None)
    assert plain.dot == "float" and plain.kernel_passes() == []
    with pytest.raises(UsageError, match="--cpu-dot int8 needs AVX-512 VNNI and VBMI"):
        plain.configure_dot("int8")
    with pytest.raises(UsageError, match="--cpu-dot applies to cpu targets"):
        get_target("metal").configure_dot("int8")


def decode_logits(artifact, ids):
    engine = fmc.load(artifact)
    seq = engine.new_sequence()
    engine.prefill(seq, ids[:-1])
    return engine.decode(seq, ids[-1]), engine


# Logits of an int8 artifact against the same artifact's float path, as max|Δ| / max|logit|
# over every prompt position (prefill) and one decode step after it. Measured on this tiny
# random model: q4f16 0.032, q8f16 0.032, q4k_m 0.025 (decode; prefill lower); on SmolLM2
# q4f16 0.072 over a 61-token prompt with the same argmax everywhere. Bound: 1.5× the tiny
# model's largest.
INT8_TOLERANCE = 0.05


def disassembly(library) -> str:
    import shutil
    import subprocess

    tool = shutil.which("objdump") or shutil.which("llvm-objdump")
    return subprocess.run([tool, "-d", str(library)], capture_output=True, text=True,
                          check=True).stdout


# qwen3-moe: the MoE expert kernels (the grouped GEMM of prompts, the gathered GEMVs of
# decode) run in integer arithmetic too.
@pytest.mark.parametrize("model, quant", [("llama-kquant", "q4f16"), ("llama-kquant", "q8f16"),
                                          ("llama-kquant", "q4k_m"), ("qwen3-moe", "q4f16")])
def test_int8_artifact_runs_within_tolerance_of_the_float_path(tiny_checkpoint, tmp_path,
                                                               model, quant):
    checkpoint = str(tiny_checkpoint(model))
    artifacts = {}
    for dot in ("float", "int8"):
        artifacts[dot] = tmp_path / dot
        compile_model(CompileOptions(model=checkpoint, output=artifacts[dot], quant=quant,
                                     target=f"cpu:{VNNI_CPU}", cpu_dot=dot,
                                     dump_ir=str(tmp_path / f"ir-{dot}")))
        manifest = json.loads((artifacts[dot] / "manifest.json").read_text())
        assert manifest["target"]["cpu_dot"] == dot
    if model == "qwen3-moe":  # both expert kernels swapped for integer-dot ones
        (swapped,) = (tmp_path / "ir-int8").glob("*-fuse-target-kernels.py")
        kernels = swapped.read_text().split("@T.prim_func")
        for name in ("moe_grouped_q4f16_rows16", "moe_experts_q4f16_rows16",
                     "moe_experts_q4f16_rows161"):
            (kernel,) = [k for k in kernels if f"def {name}(" in k]
            assert "vpdpbusd" in kernel, name
    assert "vpdpbusd" in disassembly(artifacts["int8"] / "model.so")
    assert "vpdpbusd" not in disassembly(artifacts["float"] / "model.so")
    if not get_target("cpu").has_vnni():
        pytest.skip("this CPU cannot run VNNI code")
    ids = [5, 9, 100, 3, 44, 150, 7, 7, 12]
    int8, engine = decode_logits(artifacts["int8"], ids)
    floats, _ = decode_logits(artifacts["float"], ids)
    errors = {"decode": np.abs(int8 - floats).max() / np.abs(floats).max()}
    prefill_int8 = engine.logits(ids)
    prefill_float = fmc.load(artifacts["float"]).logits(ids)
    errors["prefill"] = np.abs(prefill_int8 - prefill_float).max() / np.abs(prefill_float).max()
    assert all(0 < e <= INT8_TOLERANCE for e in errors.values()), errors
