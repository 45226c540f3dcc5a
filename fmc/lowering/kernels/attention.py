"""The paged KV cache's attention kernels, fmc's own: decode, ragged prefill (the new tokens
against each other) and paged prefill (the new tokens against the cached pages). One
(query, head) pair's online softmax per parallel iteration, one update per page or key step.

On the CPU (`gpu=False`) the iterations run on the thread pool, SIMD over the head dimension;
they replace TVM's CPU kernels everywhere. On the GPU targets (`gpu=True`) each prefill
thread runs one pair, 64 per block, its vectors in registers/local memory; a decode pair gets
a block whose threads split its pages (`_decode_split`). Correct, not tuned beyond
that: TVM's tiled GPU kernels stay in use for every model that does not need the options
below.

Each kernel has the signature and semantics of the TVM kernel it replaces (log2-domain
scores, lse = m + log2(d), the same -5e4/1.0 initial state, so an empty sequence gives the
same output), so the cache's C++ side calls it unchanged.

TVM's CPU decode kernel, `_attention_decode_cpu`, is one serial scalar loop over
sequences, heads and positions (≈160 µs per layer for SmolLM2 at 128 positions).

fmc builds its caches with RoPE applied before the append (`RopeMode.NORMAL`), so the cache
never asks for inline RoPE here (`rotary_mode` 1); the kernel asserts that instead of
carrying a second, scalar code path.

Two options a model may ask for (gemma2/gemma3, `fmc.frontend.gemma_model`), compiled into
the kernels: `softcap` — attention-logit soft-capping, scores become cap·tanh(score / cap)
before the softmax; `window` — sliding-window attention: a query at position p sees keys at
positions > p − window. The window applies to the calls whose `sm_scale` is negative (the
sliding layers pass −scale): `sm_scale` is the one per-layer value the cache's C++ side hands
its kernels unchanged, and with every layer of kind "mha" the cache passes each key block's
true start position (`k_rope_pos_offset`) and each query's position (`q_rope_position`), so
the window is exact whatever the block tree (forks) and the prefill chunking. (TVM's own
per-layer window, attention kind "mha_sliding", is not used: it cuts each block-tree depth to
its own last `window` keys and leaves the new tokens of a prefill chunk unwindowed.)"""

from __future__ import annotations

import math

from tvm.script import tirx as T

# The kernels pass lambdas over loop variables to TVMScript macros; macros expand while the
# kernel is parsed, inside the loop, so the late binding B023 warns about cannot happen.
# ruff: noqa: B023

DECODE_SYMBOL = "batch_decode_paged_kv_cpu"  # TVM's kernels these replace
RAGGED_PREFILL_SYMBOL = "batch_prefill_ragged_kv"
PAGED_PREFILL_SYMBOL = "batch_prefill_paged_kv_cpu"
KEYS_PER_STEP = 16  # keys scored per online-softmax update in prefill
LOG2E = math.log2(math.e)
GPU_THREADS = 64  # (query, head) pairs per GPU block
GPU_LANES = 4  # independent partial sums per GPU thread (instruction-level parallelism)


class _Device:
    """What differs between the CPU and GPU forms of a kernel: how the (query, head) pairs
    are spread (`pairs(n)` then `lane()`: pair = block · per_block + lane), whether head-dim
    loops are SIMD, and where a pair's private vectors live."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.per_block = GPU_THREADS if gpu else 1
        self.scope = "local" if gpu else "global"
        self.vector = T.serial if gpu else T.vectorized

    def pairs(self, count):
        if self.gpu:
            return T.thread_binding((count + GPU_THREADS - 1) // GPU_THREADS,
                                    thread="blockIdx.x")
        return T.parallel(count)

    def lane(self):
        return T.thread_binding(GPU_THREADS, thread="threadIdx.x") if self.gpu else T.serial(1)

    def lanes(self, requested: int, head_dim: int) -> int:
        return math.gcd(GPU_LANES if self.gpu else requested, head_dim)


def _attention_steps(head_dim: int, lanes: int, dtype: str, softcap: float, vector):
    """TVMScript macros the kernels share: one (query, head) pair's online softmax in the log2
    domain. Keys and values come through accessors (`key(r, d)`, `value(r, d)`), so the same
    steps read cache pages or ragged new-token rows. `state` holds m, d, new m, rescale.
    With `softcap`, q carries the plain scale and each score becomes cap·tanh(s / cap)·log2(e)
    (`q_scale` gives the factor to fold into q for either). `vector` is the head-dim loop
    kind: T.vectorized on the CPU, T.serial on the GPU."""
    chunks = head_dim // lanes

    # fmt: off
    if softcap:
        @T.macro
        def cap(scores, count):
            for r in T.serial(count):
                scores[r] = T.float32(softcap * LOG2E) * T.tanh(scores[r] * T.float32(1 / softcap))
    else:
        @T.macro
        def cap(scores, count):
            T.evaluate(0)

    @T.macro
    def begin(q_local, o_local, state, query, scale):
        state[0] = T.float32(-5e4)  # TVM's initial state: an empty sequence gives 0, lse -5e4
        state[1] = T.float32(1.0)
        for d in vector(head_dim):
            o_local[d] = T.float32(0)
        # Scores in the log2 domain: fold sm_scale·log2(e) into q once.
        for d in vector(head_dim):
            q_local[d] = T.Cast("float32", query(d)) * scale

    @T.macro
    def attend(q_local, o_local, acc, scores, state, count, key, value):
        """Score `count` keys (`lanes` partial sums, then a horizontal sum), then one update."""
        for r in T.serial(count):
            for lane in vector(lanes):
                acc[lane] = q_local[lane] * T.Cast("float32", key(r, lane))
            for c in T.serial(chunks - 1):
                for lane in vector(lanes):
                    d: T.let[T.int32] = (c + 1) * lanes + lane
                    acc[lane] = acc[lane] + q_local[d] * T.Cast("float32", key(r, d))
            scores[r] = T.float32(0)
            for lane in T.serial(lanes):
                scores[r] = scores[r] + acc[lane]
        cap(scores, count)
        state[2] = state[0]
        for r in T.serial(count):
            state[2] = T.max(state[2], scores[r])
        state[3] = T.exp2(state[0] - state[2])
        state[1] = state[1] * state[3]
        for d in vector(head_dim):
            o_local[d] = o_local[d] * state[3]
        for r in T.serial(count):
            scores[r] = T.exp2(scores[r] - state[2])
            state[1] = state[1] + scores[r]
            for d in vector(head_dim):
                o_local[d] = o_local[d] + scores[r] * T.Cast("float32", value(r, d))
        state[0] = state[2]

    @T.macro
    def finish(o_local, state, output, lse, row, head):
        for d in vector(head_dim):
            output[row, head, d] = T.Cast(dtype, o_local[d] / state[1])
        lse[row, head] = state[0] + T.log2(state[1])
    # fmt: on

    def q_scale(sm_scale):
        """What q is multiplied by: |sm_scale| (its sign flags a sliding layer), times log2(e)
        unless the soft-cap applies it after the tanh."""
        return T.max(sm_scale, -sm_scale) * T.float32(1.0 if softcap else LOG2E)

    return begin, attend, finish, q_scale


@T.macro
def _sequence_of(seq, row, indptr, batch_size):
    """seq[0] = the sequence whose rows [indptr[b], indptr[b + 1]) hold `row`: the pairs of
    all sequences are one flat parallel loop (a GPU kernel cannot loop over sequences on the
    host, which cannot read indptr)."""
    seq[0] = 0
    for i in T.serial(batch_size):
        if indptr[i + 1] <= row:
            seq[0] = seq[0] + 1


def _first_visible(window: int, sm_scale, q_position, k_start):
    """Index, among keys starting at position `k_start`, of the first key a query at
    `q_position` sees: 0 without a window or on a layer that does not slide (sm_scale ≥ 0)."""
    if not window:
        return 0
    return T.if_then_else(sm_scale < T.float32(0),
                          T.max(q_position - k_start - (window - 1), 0), 0)


def _prefill_pairs(device: _Device, num_qo_heads: int, group: int, head_dim: int,
                   lanes: int, keys_per_update: int):
    """The prefill kernels' common frame, a TVMScript macro: every (query, head) pair of the
    `total` new tokens in one flat parallel loop, the pair's private vectors, its query,
    head, KV head, sequence, row within the sequence and the sequence's query count; then
    `keys(vectors, pair, *kernel)` — the kernel's own key loop, a macro — with
    vectors = (q_local, o_local, acc, scores, state) and pair = (query, h, kv, b, row,
    q_count); `kernel` is the buffers and scalars it reads."""
    H_qo, D, scope, per_block = num_qo_heads, head_dim, device.scope, device.per_block

    # fmt: off
    @T.macro
    def each_pair(total, q_indptr, batch_size, keys, kernel):
        for block in device.pairs(total * H_qo):
            for lane in device.lane():
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    q_local = T.sblock_alloc_buffer((D,), "float32", scope=scope)
                    o_local = T.sblock_alloc_buffer((D,), "float32", scope=scope)
                    acc = T.sblock_alloc_buffer((lanes,), "float32", scope=scope)
                    scores = T.sblock_alloc_buffer((keys_per_update,), "float32", scope=scope)
                    state = T.sblock_alloc_buffer((4,), "float32", scope=scope)
                    seq = T.sblock_alloc_buffer((1,), "int32", scope=scope)
                    qh: T.let[T.int32] = block * per_block + lane
                    if q_indptr[0] * H_qo <= qh and qh < q_indptr[batch_size] * H_qo:
                        query: T.let[T.int32] = qh // H_qo
                        h: T.let[T.int32] = qh % H_qo
                        _sequence_of(seq, query, q_indptr, batch_size)
                        b: T.let[T.int32] = seq[0]
                        keys((q_local, o_local, acc, scores, state),
                             (query, h, h // group, b, query - q_indptr[b],
                              q_indptr[b + 1] - q_indptr[b]), *kernel)
    # fmt: on
    return each_pair


def decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
                     page_size: int = 16, lanes: int = 16, softcap: float = 0.0,
                     window: int = 0, gpu: bool = False):
    """Decode: one new token per sequence against its cached pages. The signature is TVM's;
    the body is `_decode_per_pair` on the CPU, `_decode_split` on the GPU."""
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    make = _decode_split if gpu else _decode_per_pair
    body = make(H_qo // H_kv, H_qo, D, dtype, page_size, lanes, softcap, window)

    # fmt: off
    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
        output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
        rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": DECODE_SYMBOL})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, page_size, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32",
                                           elem_offset=indptr_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32",
                                           elem_offset=values_offset)
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_offset)
        # Positions: of each sequence's first cached key and of its query (the window).
        k_start = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32",
                                 elem_offset=k_rope_offset)
        q_position = T.match_buffer(q_rope_position_handle, (B,), "int32",
                                    elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")

        assert rotary_mode == 0, "fmc's decode attention expects RoPE applied at append"
        body(B, Q, pages, page_table_indptr, page_table_values, last_page_len, k_start,
             q_position, output, lse, sm_scale)
    # fmt: on
    return batch_decode_paged_kv


def _decode_page(attend, page_size: int):
    """A decode macro both bodies share: page p of sequence b's pages (from `first`, of
    `num_pages`, the last holding last_page_len[b] keys) into the pair's online softmax,
    from its first visible key (`skip` keys of the sequence are hidden)."""

    # fmt: off
    @T.macro
    def attend_page(vectors, pages, page_table_values, last_page_len, b, kv, first, num_pages,
                    p, skip):
        q_local, o_local, acc, scores, state = vectors
        page: T.let[T.int32] = page_table_values[first + p]
        rows: T.let[T.int32] = T.if_then_else(p == num_pages - 1, last_page_len[b], page_size)
        low: T.let[T.int32] = T.max(skip - p * page_size, 0)
        attend(q_local, o_local, acc, scores, state, rows - low,
               lambda r, d: pages[page, 0, kv, low + r, d],
               lambda r, d: pages[page, 1, kv, low + r, d])
    # fmt: on
    return attend_page


def _decode_per_pair(group: int, H_qo: int, D: int, dtype: str, page_size: int, lanes: int,
                     softcap: float, window: int):
    """CPU decode body: (sequence, head) pairs on the thread pool, one online-softmax update
    per page, SIMD over the head dimension."""
    lanes = math.gcd(lanes, D)
    begin, attend, finish, q_scale = _attention_steps(D, lanes, dtype, softcap, T.vectorized)
    attend_page = _decode_page(attend, page_size)

    # fmt: off
    @T.macro
    def body(B, Q, pages, page_table_indptr, page_table_values, last_page_len, k_start,
             q_position, output, lse, sm_scale):
        for bh in T.parallel(B * H_qo):
            with T.sblock("attn"):
                # Regions would be inferred over the let-bound page range; the kernel is
                # scheduled by hand, so none are needed.
                T.reads()
                T.writes()
                q_local = T.sblock_alloc_buffer((D,), "float32")
                o_local = T.sblock_alloc_buffer((D,), "float32")
                acc = T.sblock_alloc_buffer((lanes,), "float32")
                scores = T.sblock_alloc_buffer((page_size,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")  # m, d, new m, rescale
                b: T.let[T.int32] = bh // H_qo
                h: T.let[T.int32] = bh % H_qo
                kv: T.let[T.int32] = h // group
                first: T.let[T.int32] = page_table_indptr[b]
                num_pages: T.let[T.int32] = page_table_indptr[b + 1] - first
                skip: T.let[T.int32] = _first_visible(window, sm_scale, q_position[b], k_start[b])
                begin(q_local, o_local, state, lambda d: Q[b, h, d], q_scale(sm_scale))
                for p in T.serial(skip // page_size, num_pages):
                    attend_page((q_local, o_local, acc, scores, state), pages,
                                page_table_values, last_page_len, b, kv, first, num_pages, p,
                                skip)
                finish(o_local, state, output, lse, b, h)
    # fmt: on
    return body


def _decode_split(group: int, H_qo: int, D: int, dtype: str, page_size: int, _lanes: int,
                  softcap: float, window: int):
    """GPU decode body: a block per (sequence, head), its `split` threads each running the
    online softmax over every split-th page of the visible range, then merged through shared
    memory (each thread's state rescaled to the common maximum) — a decode step has only
    batch × heads pairs, too few to fill a GPU one thread each. Thread 0 starts from TVM's
    empty state (d = 1) and the others from d = 0, so an empty sequence gives TVM's output
    and lse exactly, and a thread without pages adds nothing."""
    split = max(1, min(32, 2048 // D))  # the merge buffer [split, D] stays ≤ 8 KiB
    lanes = math.gcd(GPU_LANES, D)
    begin, attend, _, q_scale = _attention_steps(D, lanes, dtype, softcap, T.serial)
    attend_page = _decode_page(attend, page_size)

    # fmt: off
    @T.macro
    def body(B, Q, pages, page_table_indptr, page_table_values, last_page_len, k_start,
             q_position, output, lse, sm_scale):
        for bh in T.thread_binding(B * H_qo, thread="blockIdx.x"):
            for tx in T.thread_binding(split, thread="threadIdx.x"):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    q_local = T.sblock_alloc_buffer((D,), "float32", scope="local")
                    o_local = T.sblock_alloc_buffer((D,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                    scores = T.sblock_alloc_buffer((page_size,), "float32", scope="local")
                    state = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    merged = T.sblock_alloc_buffer((2,), "float32", scope="local")  # max, sum
                    o_shared = T.sblock_alloc_buffer((split, D), "float32", scope="shared")
                    md_shared = T.sblock_alloc_buffer((split, 2), "float32", scope="shared")
                    b: T.let[T.int32] = bh // H_qo
                    h: T.let[T.int32] = bh % H_qo
                    kv: T.let[T.int32] = h // group
                    first: T.let[T.int32] = page_table_indptr[b]
                    num_pages: T.let[T.int32] = page_table_indptr[b + 1] - first
                    skip: T.let[T.int32] = _first_visible(window, sm_scale, q_position[b],
                                                          k_start[b])
                    begin(q_local, o_local, state, lambda d: Q[b, h, d], q_scale(sm_scale))
                    state[1] = T.if_then_else(tx == 0, T.float32(1.0), T.float32(0.0))
                    for step in T.serial((num_pages - skip // page_size + split - 1) // split):
                        p: T.let[T.int32] = skip // page_size + step * split + tx
                        if p < num_pages:
                            attend_page((q_local, o_local, acc, scores, state), pages,
                                        page_table_values, last_page_len, b, kv, first,
                                        num_pages, p, skip)
                    md_shared[tx, 0] = state[0]
                    md_shared[tx, 1] = state[1]
                    for d in T.serial(D):
                        o_shared[tx, d] = o_local[d]
                    T.tvm_storage_sync("shared")
                    merged[0] = T.float32(-5e4)
                    for t in T.serial(split):
                        merged[0] = T.max(merged[0], md_shared[t, 0])
                    merged[1] = T.float32(0)
                    for t in T.serial(split):
                        merged[1] = merged[1] + md_shared[t, 1] * T.exp2(md_shared[t, 0]
                                                                         - merged[0])
                    for chunk in T.serial((D + split - 1) // split):
                        d: T.let[T.int32] = chunk * split + tx
                        if d < D:
                            o_local[0] = T.float32(0)
                            for t in T.serial(split):
                                o_local[0] = o_local[0] + o_shared[t, d] * T.exp2(
                                    md_shared[t, 0] - merged[0])
                            output[b, h, d] = T.Cast(dtype, o_local[0] / merged[1])
                    if tx == 0:
                        lse[b, h] = merged[0] + T.log2(merged[1])
    # fmt: on
    return body


def ragged_prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int,
                             dtype: str, lanes: int = 16, softcap: float = 0.0, window: int = 0,
                             gpu: bool = False):
    """Self-attention of the new tokens of each sequence (q, k, v ragged by indptr), causal
    or not: TVM's `_attention_prefill_ragged_cpu` semantics (masked scores are -5e4·scale,
    so they add exactly 0), parallel over (query token, head) across all sequences, keys in
    steps of KEYS_PER_STEP with one online-softmax update per step."""
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    device = _Device(gpu)
    lanes = device.lanes(lanes, D)
    step = KEYS_PER_STEP
    begin, attend, finish, q_scale = _attention_steps(D, lanes, dtype, softcap, device.vector)
    each_pair = _prefill_pairs(device, H_qo, H_qo // H_kv, D, lanes, step)

    # fmt: off
    @T.macro
    def new_keys(vectors, pair, q, k, v, kv_indptr, q_position, k_start, output, lse, causal,
                 sm_scale):
        """The pair's query against its sequence's new keys, KEYS_PER_STEP per update."""
        q_local, o_local, acc, scores, state = vectors
        query, h, kv, b, row, q_count = pair
        kv_start: T.let[T.int32] = kv_indptr[b]
        k_count: T.let[T.int32] = kv_indptr[b + 1] - kv_start
        # Keys this query sees: all, or (causal) up to its own position.
        visible: T.let[T.int32] = T.if_then_else(
            causal > 0, T.min(k_count - q_count + row + 1, k_count), k_count)
        skip: T.let[T.int32] = _first_visible(window, sm_scale, q_position[query], k_start[b])
        begin(q_local, o_local, state, lambda d: q[query, h, d], q_scale(sm_scale))
        for start in T.serial((visible - skip + step - 1) // step):
            first_key: T.let[T.int32] = kv_start + skip + start * step
            attend(q_local, o_local, acc, scores, state,
                   T.min(step, visible - skip - start * step),
                   lambda r, d: k[first_key + r, kv, d],
                   lambda r, d: v[first_key + r, kv, d])
        finish(o_local, state, output, lse, query, h)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": RAGGED_PREFILL_SYMBOL})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, H_kv, D), dtype)
        v = T.match_buffer(var_v, (kv_len, H_kv, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32",
                                   elem_offset=kv_indptr_offset)
        # Positions: of each query, and of each sequence's first new key (the window).
        q_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",
                                    elem_offset=q_rope_offset)
        k_start = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                 elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")

        assert rotary_mode == 0, "fmc's prefill attention expects RoPE applied at append"
        each_pair(qo_len, q_indptr, batch_size, new_keys,
                  (q, k, v, kv_indptr, q_position, k_start, output, lse, causal, sm_scale))
    # fmt: on
    return batch_prefill_ragged_kv


def paged_prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
                            page_size: int = 16, lanes: int = 16, softcap: float = 0.0,
                            window: int = 0, gpu: bool = False):
    """New tokens (q ragged by indptr) attending to a sequence's cached pages: the part of a
    chunked prefill or a later chat turn before the new tokens' own keys (which the ragged
    kernel covers; the cache merges both by lse). Causal: query i of n new tokens sees the
    first kv_len − n + i + 1 cached positions. Replaces TVM's `_attention_prefill_cpu` (a serial
    scalar loop that also reads its one-element rescale buffer at every head-dim index);
    checked against a numpy reference, parallel over (query token, head), one online-softmax
    update per page."""
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    device = _Device(gpu)
    lanes = device.lanes(lanes, D)
    begin, attend, finish, q_scale = _attention_steps(D, lanes, dtype, softcap, device.vector)
    each_pair = _prefill_pairs(device, H_qo, H_qo // H_kv, D, lanes, page_size)

    # fmt: off
    @T.macro
    def cached_keys(vectors, pair, q, pages, page_indptr, page_values, last_page_len, k_start,
                    q_position, output, lse, causal, sm_scale):
        """The pair's query against its sequence's cached pages, one update per page."""
        q_local, o_local, acc, scores, state = vectors
        query, h, kv, b, row, q_count = pair
        first: T.let[T.int32] = page_indptr[b]
        num_pages: T.let[T.int32] = page_indptr[b + 1] - first
        kv_len: T.let[T.int32] = T.if_then_else(
            num_pages > 0, (num_pages - 1) * page_size + last_page_len[b], 0)
        visible: T.let[T.int32] = T.if_then_else(
            causal > 0, T.max(T.min(kv_len - q_count + row + 1, kv_len), 0), kv_len)
        skip: T.let[T.int32] = _first_visible(window, sm_scale, q_position[query], k_start[b])
        begin(q_local, o_local, state, lambda d: q[query, h, d], q_scale(sm_scale))
        for p in T.serial(skip // page_size, (visible + page_size - 1) // page_size):
            page: T.let[T.int32] = page_values[first + p]
            low: T.let[T.int32] = T.max(skip - p * page_size, 0)
            attend(q_local, o_local, acc, scores, state,
                   T.min(page_size, visible - p * page_size) - low,
                   lambda r, d: pages[page, 0, kv, low + r, d],
                   lambda r, d: pages[page, 1, kv, low + r, d])
        finish(o_local, state, output, lse, query, h)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
        var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
        rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": PAGED_PREFILL_SYMBOL})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, H_kv, page_size, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32",
                                     elem_offset=page_values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32",
                                       elem_offset=length_offset)
        # Positions: of each sequence's first cached key and of each query (the window).
        k_start = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                 elem_offset=k_rope_offset)
        q_position = T.match_buffer(var_q_rope_position, (total_len,), "int32",
                                    elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H_qo), "float32")

        assert rotary_mode == 0, "fmc's prefill attention expects RoPE applied at append"
        each_pair(total_len, q_indptr, batch_size, cached_keys,
                  (q, pages, page_indptr, page_values, last_page_len, k_start, q_position,
                   output, lse, causal, sm_scale))
    # fmt: on
    return batch_prefill_paged_kv_cpu
