"""Swap TVM's CPU paged-KV-cache attention kernels for fmc's (fmc/lowering/kernels)."""

from __future__ import annotations

import tvm
from tvm import tirx

from fmc.lowering.kernels.attention_cpu import DECODE_SYMBOL, decode_attention


def _buffer_shape(func: tirx.PrimFunc, index: int) -> list:
    return list(func.params[index].ty.shape)  # 0.27: a buffer parameter carries its type


def _int(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


@tvm.transform.module_pass(opt_level=0, name="ReplaceCPUAttention")
class ReplaceCPUAttention:
    """Find the cache's decode attention by its symbol, read the head counts, head size, page
    size and dtype off its buffers (Q [B, H_qo, D], pages [P, 2, H_kv, page, D]) and put
    fmc's kernel in its place; the cache calls it through the same global."""

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or \
                    (func.attrs or {}).get("global_symbol") != DECODE_SYMBOL:
                continue
            q_shape, page_shape = _buffer_shape(func, 0), _buffer_shape(func, 1)
            heads, head_dim = _int(q_shape[1]), _int(q_shape[2])
            kv_heads, page_size = _int(page_shape[2]), _int(page_shape[3])
            dtype = func.params[0].ty.dtype
            if None in (heads, head_dim, kv_heads, page_size):
                continue  # not the layout this kernel implements: keep TVM's
            mod[gv] = decode_attention(kv_heads, heads, head_dim, str(dtype), page_size,
                                       self.lanes).with_attr("global_symbol", DECODE_SYMBOL)
        return mod
