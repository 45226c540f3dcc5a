"""The `vulkan` target: fmc's own TIR→GLSL→SPIR-V route. Every kernel of a model compiles
and validates; the library carries TVM's Vulkan module (TVM's loader receives exactly those
bytes); and generated kernels run on Mesa's lavapipe and match numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vulkan_runner import recording_launches

from fmc.compiler import CompileOptions, build_ir
from fmc.quant.registry import get as get_scheme
from fmc.targets.vulkan import GLSLC, SPIRV_VAL
from fmc.targets.vulkan_module import LibraryBlob, find_vulkan_module

pytestmark = pytest.mark.skipif(not (GLSLC.path() and SPIRV_VAL.path()),
                                reason="needs glslc and spirv-val (apt-get install glslc "
                                       "spirv-tools)")


@pytest.fixture(scope="module", autouse=True)
def _launches_recorded():
    """Shaders built in this module carry their launch grid and buffer shapes (run alone)."""
    with recording_launches():
        yield


@pytest.fixture(scope="module")
def vulkan_build(tiny_checkpoint, tiny_artifact):
    """(artifact, the target object of a second in-memory build: GLSL and launch grids)."""
    from tvm import relax

    model = str(tiny_checkpoint("llama-quant"))
    out = tiny_artifact("llama-quant", "q4f16", "vulkan")  # shared with test_vulkan_runtime
    state = build_ir(CompileOptions(model=model, target="vulkan", quant="q4f16"))
    target = state.target.tvm_target()
    with state.target.codegen_hooks(), target:
        # the compiler's own build options: GPU targets lower TIR with fmc's pipeline
        relax.build(state.mod, target=target, relax_pipeline=None,
                    **state.target.build_options())
    return out, state.target


@pytest.fixture(scope="module")
def device():
    from vulkan_runner import VulkanDevice

    device = VulkanDevice()
    yield device
    device.close()


def kernels_in(artifact):
    return {k.name: k for k in find_vulkan_module((artifact / "model.so").read_bytes())}


def test_every_kernel_is_valid_spirv_inside_the_library(vulkan_build):
    artifact, target = vulkan_build
    kernels = kernels_in(artifact)
    assert len(kernels) > 30 and set(kernels) == set(target.shaders)
    validation = json.loads((artifact / "manifest.json").read_text())["target"]["validation"]
    assert validation["spirv_kernels"] == len(kernels)
    for kernel in kernels.values():
        assert kernel.spirv[:4] == b"\x03\x02\x23\x07"  # SPIR-V magic
        assert kernel.launch_params and all(t.startswith(("blockIdx", "threadIdx"))
                                            for t in kernel.launch_params)


def test_tvm_hands_the_embedded_module_to_fmcs_vulkan_loader(vulkan_build):
    """The library's blob is TVM's format: TVM parses it, finds the "vulkan" import and
    hands exactly our bytes to `ffi.Module.load_from_bytes.vulkan` (fmc's runtime plugin),
    whose module then resolves every kernel by name."""
    import tvm

    from fmc.devices.vulkan_runtime import ensure_vulkan_runtime
    from fmc.targets.vulkan_module import decode_vulkan_module

    artifact, _ = vulkan_build
    ensure_vulkan_runtime()
    library = tvm.runtime.load_module(str(artifact / "model.so"))
    (vulkan,) = [m for m in library.imports[0].imports if m.kind == "vulkan"]
    # Packing it again (under a placeholder root) serialises it: the bytes it was given.
    root = tvm.get_global_func("runtime.CSourceModuleCreate")("/**/", "c", [], [])
    root.import_module(vulkan)
    packed = tvm.get_global_func("runtime.ModulePackImportsToTensor")(root)
    blob = LibraryBlob.parse(bytes(packed.numpy().tobytes()))
    loaded = decode_vulkan_module(blob.modules[blob.index_of("vulkan")][1])
    assert loaded == find_vulkan_module((artifact / "model.so").read_bytes())
    assert {k.name for k in loaded} == set(kernels_in(artifact))
    assert all(vulkan.implements_function(k.name) for k in loaded)
    assert not vulkan.implements_function("no_such_kernel")


def test_library_blob_round_trips():
    blob = LibraryBlob([0, 1, 1], [1], [("relax.VMExecutable", b"exec"), ("_lib", None)])
    assert LibraryBlob.parse(blob.to_bytes()) == blob
    blob.add_import(1, "vulkan", b"kernels")
    assert blob.indptr == [0, 1, 2, 2] and blob.children == [1, 2]
    assert LibraryBlob.parse(blob.to_bytes()).modules[2] == ("vulkan", b"kernels")


def test_rms_norm_kernel_runs_on_lavapipe(vulkan_build, device):
    artifact, target = vulkan_build
    kernel = kernels_in(artifact)["rms_norm_kernel"]  # batch_decode's input norm
    rng = np.random.default_rng(0)
    batch = 3
    x = rng.standard_normal((batch, 64)).astype(np.float16)
    weight = rng.standard_normal(64).astype(np.float16)
    out, *_ = device.run(kernel.spirv, [np.zeros((batch, 64), np.float16), x, weight],
                         [("int64", batch)], (batch, 1, 1))
    x32 = x.astype(np.float32)
    expected = x32 / np.sqrt((x32**2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def decode_o_proj(target) -> str:
    """The decode step's o_proj kernel (static shapes: no scalar parameters)."""
    (name,) = [name for name, shader in target.shaders.items()
               if all(p.is_buffer for p in shader.params)
               and any("o_proj_q_weight" in p.name for p in shader.params)]
    return name


def test_int4_gemv_with_residual_runs_on_lavapipe(vulkan_build, device):
    """Decode's o_proj: out = residual + x · dequantize(W)ᵀ with q4f16 weights, the
    dequantize fused into the GEMV."""
    artifact, target = vulkan_build
    name = decode_o_proj(target)
    kernel, shader = kernels_in(artifact)[name], target.shaders[name]
    roles = [p.name.split("_ptr")[0] for p in shader.params]
    assert roles[1] == "input_embed" and "o_proj_q_scale" in roles[2] and \
        "o_proj_q_weight" in roles[3]
    rng = np.random.default_rng(1)
    scheme = get_scheme("q4f16")
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    codes, scales = scheme.quantize(weight)
    dequantized = scheme.dequantize([codes, scales]).astype(np.float32)
    x = rng.standard_normal(64).astype(np.float16)
    residual = rng.standard_normal(64).astype(np.float16)
    assert None not in shader.grid
    out, *_ = device.run(kernel.spirv, [np.zeros(64, np.float16), residual, scales, codes, x],
                         [], shader.grid)
    expected = residual.astype(np.float32) + dequantized @ x.astype(np.float32)
    scale = np.abs(expected).max()
    assert np.abs(out.astype(np.float32) - expected).max() <= 1e-2 * scale


def test_a_wrong_kernel_is_caught(vulkan_build, device):
    """Negative control for the comparisons above: the same GEMV with the residual missing
    differs from the reference."""
    artifact, target = vulkan_build
    name = decode_o_proj(target)
    kernel, shader = kernels_in(artifact)[name], target.shaders[name]
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2**32, (64, 8), dtype=np.uint64).astype(np.uint32)
    scales = np.full((64, 2), 0.01, np.float16)
    x = rng.standard_normal(64).astype(np.float16)
    residual = np.ones(64, np.float16)
    with_residual, *_ = device.run(kernel.spirv, [np.zeros(64, np.float16), residual, scales,
                                                  codes, x], [], shader.grid)
    without, *_ = device.run(kernel.spirv, [np.zeros(64, np.float16), 0 * residual, scales,
                                            codes, x], [], shader.grid)
    np.testing.assert_allclose(with_residual - without, 1.0, atol=2e-2)


@pytest.mark.parametrize("name", ["batch_decode_paged_kv_kernel",
                                  "batch_decode_paged_kv_sliding_window_kernel"])
def test_paged_decode_attention_runs_on_lavapipe(vulkan_build, device, name):
    """TVM's paged-KV decode attention kernel (shared memory, vector loads, online softmax,
    barriers inside loops, grouped-query heads) through fmc's GLSL route, against numpy
    attention over the same pages: two sequences of 20 and 7 tokens in 16-token pages. The
    sliding-window variant gets a window that starts at 0 with no sink (full attention)."""
    import math

    from vulkan_runner import run_shader

    artifact, target = vulkan_build
    heads, kv_heads, head_dim = model_dims(vulkan_build)
    page_size = 16
    kernel, shader = kernels_in(artifact)[name], target.shaders[name]
    rng = np.random.default_rng(3)
    lengths, pages_of = [20, 7], [[0, 1], [2]]
    pages = rng.standard_normal((3, 2, kv_heads, page_size, head_dim)).astype(np.float16)
    q = rng.standard_normal((2, heads, head_dim)).astype(np.float16)
    arrays = {
        "Q": q, "pages": pages,
        "page_table_indptr": np.array([0, 2, 3], np.int32),
        "page_table_values": np.array([0, 1, 2], np.int32),
        "length_info": np.array([lengths[0] - 16, lengths[1]], np.int32),  # last page's fill
        "k_rope_pos_offset": np.zeros(2, np.int32), "q_rope_position": np.zeros(2, np.int32),
        "output": np.zeros((2, heads, head_dim), np.float16),
        "lse": np.zeros(2 * heads, np.float32)}
    if "sliding_window" in name:  # rows: last page fill, window start, attention-sink size
        arrays["length_info"] = np.array([[lengths[0] - 16, lengths[1]], [0, 0], [0, 0]],
                                         np.int32)
    sm_scale = 1 / math.sqrt(head_dim)
    known = {"B": 2, "rope_scale": 1.0, "rope_theta": 10000.0, "rotary_mode": 0,
             "sm_scale": sm_scale}
    results = run_shader(device, shader, kernel.spirv, arrays, known)
    group = heads // kv_heads
    for b, length in enumerate(lengths):
        slots = [(pages_of[b][i // page_size], i % page_size) for i in range(length)]
        keys = np.stack([pages[p, 0, :, s] for p, s in slots], 1).astype(np.float32)
        values = np.stack([pages[p, 1, :, s] for p, s in slots], 1).astype(np.float32)
        keys, values = np.repeat(keys, group, 0), np.repeat(values, group, 0)  # GQA
        scores = np.einsum("hd,htd->ht", q[b].astype(np.float32), keys) * sm_scale
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected = np.einsum("ht,htd->hd", weights, values)
        np.testing.assert_allclose(results["output"][b].astype(np.float32), expected,
                                   atol=5e-3, rtol=5e-3)
        # lse is log2-sum-exp of the scores (the kernel works in base 2)
        expected_lse = np.log2(np.exp(scores).sum(-1))
        np.testing.assert_allclose(results["lse"][b * heads:(b + 1) * heads], expected_lse,
                                   atol=1e-3)


def model_dims(vulkan_build) -> tuple[int, int, int]:
    """(attention heads, KV heads, head dim) of the tiny model the artifact was built from."""
    config = json.loads((vulkan_build[0] / "manifest.json").read_text())["model"]
    heads = config["num_attention_heads"]
    return heads, config["num_key_value_heads"], config["hidden_size"] // heads


def run_kernel(vulkan_build, device, name, arrays, known):
    from vulkan_runner import run_shader

    artifact, target = vulkan_build
    return run_shader(device, target.shaders[name], kernels_in(artifact)[name].spirv, arrays,
                      known)


def test_copy_single_page_runs_on_lavapipe(vulkan_build, device):
    """Forking a sequence copies the first slots of its last page into a fresh page."""
    _, kv_heads, head_dim = model_dims(vulkan_build)
    pages = np.random.default_rng(4).standard_normal((4, 2, kv_heads, 16, head_dim)) \
        .astype(np.float16)
    result = run_kernel(vulkan_build, device, "copy_single_page_kernel", {"pages": pages},
                        {"copy_length": 5, "page_size": 16, "src_page_id": 1,
                         "tgt_page_id": 3, "num_pages": 4})["pages"]
    expected = pages.copy()
    expected[3, :, :, :5] = pages[1, :, :, :5]
    np.testing.assert_array_equal(result, expected)


def test_attention_state_merge_runs_on_lavapipe(vulkan_build, device):
    """Merging two partial attention results (values + base-2 log-sum-exp), in place."""
    rng = np.random.default_rng(5)
    n, heads, dim = 3, 4, 16
    v, v_other = (rng.standard_normal((n, heads, dim)).astype(np.float16) for _ in range(2))
    s, s_other = (rng.standard_normal((n, heads)).astype(np.float32) for _ in range(2))
    result = run_kernel(vulkan_build, device, "tir_attention_merge_state_kernel",
                        {"V": v, "S": s, "V_other": v_other, "S_other": s_other},
                        {"N": n, "H": heads, "D": dim})
    top = np.maximum(s, s_other)
    w, w_other = np.exp2(s - top), np.exp2(s_other - top)
    expected_v = (v.astype(np.float32) * w[..., None] + v_other.astype(np.float32)
                  * w_other[..., None]) / (w + w_other)[..., None]
    np.testing.assert_allclose(result["V"].astype(np.float32), expected_v, atol=2e-3,
                               rtol=2e-3)
    np.testing.assert_allclose(result["S"], np.log2(w + w_other) + top, atol=1e-5)


def test_rope_split_runs_on_lavapipe(vulkan_build, device):
    """The fused q/k/v split with rotary embedding at arbitrary positions (HF rotate_half)."""
    heads, kv_heads, dim = model_dims(vulkan_build)
    rng = np.random.default_rng(6)
    seq = 3
    qkv = rng.standard_normal((seq, heads + 2 * kv_heads, dim)).astype(np.float16)
    positions = np.array([3, 17, 1], np.int32)
    arrays = {"qkv": qkv, "position_map": positions,
              "q": np.zeros((seq, heads, dim), np.float16),
              "k": np.zeros((seq, kv_heads, dim), np.float16),
              "v": np.zeros((seq, kv_heads, dim), np.float16)}
    result = run_kernel(vulkan_build, device, "fused_rope_kernel", arrays,
                        {"seq_len": seq, "apply_rope": 1})
    half = dim // 2
    theta = json.loads((vulkan_build[0] / "manifest.json").read_text())["model"]["rope_theta"]
    inv_freq = theta ** (-(2 * (np.arange(dim) % half)) / dim)
    angle = positions[:, None, None] * inv_freq[None, None, :]
    x = qkv.astype(np.float32)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    roped = x * np.cos(angle) + rotated * np.sin(angle)
    np.testing.assert_allclose(result["q"].astype(np.float32), roped[:, :heads], atol=4e-3,
                               rtol=4e-3)
    np.testing.assert_allclose(result["k"].astype(np.float32),
                               roped[:, heads:heads + kv_heads], atol=4e-3, rtol=4e-3)
    np.testing.assert_array_equal(result["v"], qkv[:, heads + kv_heads:])


@pytest.mark.parametrize("name", ["batch_prefill_paged_kv_kernel",
                                  "batch_prefill_paged_kv_sliding_window_kernel"])
def test_paged_prefill_attention_runs_on_lavapipe(vulkan_build, device, name):
    """TVM's persistent prefill attention kernel (tile scheduler, causal mask with a cached
    prefix): a 5-token chunk after 15 cached tokens, and a fresh 7-token prompt. The
    sliding-window variant masks only keys older than its window (1024 positions, compiled
    in), so with a window from 0 and no sink every key is visible."""
    import math

    heads, kv_heads, dim = model_dims(vulkan_build)
    page_size = 16
    rng = np.random.default_rng(7)
    q_lengths, kv_lengths, pages_of = [5, 7], [20, 7], [[0, 1], [2]]
    pages = rng.standard_normal((3, 2, kv_heads, page_size, dim)).astype(np.float16)
    q = rng.standard_normal((sum(q_lengths), heads, dim)).astype(np.float16)
    arrays = {
        "q": q, "pages": pages, "q_indptr": np.array([0, 5, 12], np.int32),
        "page_indptr": np.array([0, 2, 3], np.int32),
        "page_values": np.array([0, 1, 2], np.int32),
        "length_info": np.array([kv_lengths[0] - 16, kv_lengths[1]], np.int32),
        "k_rope_pos_offset": np.zeros(2, np.int32),
        "q_rope_position": np.zeros(sum(q_lengths), np.int32),
        "output": np.zeros_like(q), "lse": np.zeros(sum(q_lengths) * heads, np.float32)}
    sliding = "sliding_window" in name
    if sliding:  # rows: last page fill, window start, attention-sink size
        arrays["length_info"] = np.array([[kv_lengths[0] - 16, kv_lengths[1]], [0, 0],
                                          [0, 0]], np.int32)
    sm_scale = 1 / math.sqrt(dim)
    result = run_kernel(vulkan_build, device, name, arrays,
                        {"batch_size": 2, "causal": 1, "rope_scale": 1.0,
                         "rope_theta": 10000.0, "rotary_mode": 0, "sm_scale": sm_scale})
    group, start = heads // kv_heads, 0
    for b, (q_len, kv_len) in enumerate(zip(q_lengths, kv_lengths, strict=True)):
        slots = [(pages_of[b][i // page_size], i % page_size) for i in range(kv_len)]
        keys = np.repeat(np.stack([pages[p, 0, :, s] for p, s in slots], 1), group, 0)
        values = np.repeat(np.stack([pages[p, 1, :, s] for p, s in slots], 1), group, 0)
        queries = q[start:start + q_len].astype(np.float32)
        scores = np.einsum("qhd,htd->qht", queries, keys.astype(np.float32)) * sm_scale
        rows, columns = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
        visible = columns >= kv_len - np.maximum(1023 - rows, 0) if sliding else \
            columns <= rows + kv_len - q_len
        scores = np.where(visible[:, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected = np.einsum("qht,htd->qhd", weights, values.astype(np.float32))
        np.testing.assert_allclose(result["output"][start:start + q_len].astype(np.float32),
                                   expected, atol=5e-3, rtol=5e-3)
        start += q_len


def test_ragged_prefill_attention_runs_on_lavapipe(vulkan_build, device):
    """The prompt chunk attending to itself (K/V not yet in pages), causal."""
    import math

    heads, kv_heads, dim = model_dims(vulkan_build)
    rng = np.random.default_rng(8)
    lengths = [6, 11]
    total = sum(lengths)
    q = rng.standard_normal((total, heads, dim)).astype(np.float16)
    k, v = (rng.standard_normal((total, kv_heads, dim)).astype(np.float16) for _ in range(2))
    indptr = np.array([0, 6, 17], np.int32)
    arrays = {"q": q, "k": k, "v": v, "q_indptr": indptr, "kv_indptr": indptr,
              "k_rope_pos_offset": np.zeros(2, np.int32),
              "q_rope_position": np.zeros(total, np.int32),
              "output": np.zeros_like(q), "lse": np.zeros(total * heads, np.float32)}
    sm_scale = 1 / math.sqrt(dim)
    result = run_kernel(vulkan_build, device, "batch_prefill_ragged_kv_kernel", arrays,
                        {"batch_size": 2, "causal": 1, "rope_scale": 1.0,
                         "rope_theta": 10000.0, "rotary_mode": 0, "sm_scale": sm_scale})
    group = heads // kv_heads
    for start, end in zip(indptr[:-1], indptr[1:], strict=True):
        n = end - start
        keys = np.repeat(k[start:end].astype(np.float32), group, 1)
        values = np.repeat(v[start:end].astype(np.float32), group, 1)
        scores = np.einsum("qhd,thd->qht", q[start:end].astype(np.float32), keys) * sm_scale
        visible = np.arange(n)[None, :] <= np.arange(n)[:, None]
        scores = np.where(visible[:, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected = np.einsum("qht,thd->qhd", weights, values)
        np.testing.assert_allclose(result["output"][start:end].astype(np.float32), expected,
                                   atol=5e-3, rtol=5e-3)


def test_debug_kv_reader_runs_on_lavapipe(vulkan_build, device):
    """Gathering a sequence's K/V back out of the pages by position."""
    _, kv_heads, dim = model_dims(vulkan_build)
    pages = np.random.default_rng(9).standard_normal((3, 2, kv_heads, 16, dim)) \
        .astype(np.float16)
    positions = np.array([17, 3, 40], np.int32)  # page * 16 + slot
    shape = (1, len(positions), kv_heads, dim)
    result = run_kernel(vulkan_build, device, "tir_kv_cache_debug_get_kv_kernel",
                        {"pages": pages, "position_map": positions,
                         "k_data": np.zeros(shape, np.float16),
                         "v_data": np.zeros(shape, np.float16)},
                        {"layer_id": 0, "page_size": 16, "seqlen": len(positions),
                         "num_pages": 3})
    for i, position in enumerate(positions):
        page, slot = divmod(int(position), 16)
        np.testing.assert_array_equal(result["k_data"][0, i], pages[page, 0, :, slot])
        np.testing.assert_array_equal(result["v_data"][0, i], pages[page, 1, :, slot])


def test_compaction_copy_runs_on_lavapipe(vulkan_build, device):
    """Moving tokens between page slots (src/dst positions are page * 16 + slot)."""
    _, kv_heads, dim = model_dims(vulkan_build)
    pages = np.random.default_rng(10).standard_normal((3, 2, kv_heads, 16, dim)) \
        .astype(np.float16)
    moves = [(3, 20), (5, 21), (40, 7)]
    positions = np.array([[s for s, _ in moves], [d for _, d in moves]], np.int32)
    result = run_kernel(vulkan_build, device, "compact_kv_copy_kernel",
                        {"pages": pages, "copy_src_dst_pos": positions,
                         "copy_length_indptr": np.array([0, 2, 3], np.int32)},
                        {"batch_size": 2, "total_copy_length": len(moves), "num_pages": 3})
    expected = pages.copy()
    for source, target in moves:
        expected[target // 16, :, :, target % 16] = pages[source // 16, :, :, source % 16]
    np.testing.assert_array_equal(result["pages"], expected)
