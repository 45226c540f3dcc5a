"""q8f16: symmetric int8, group 32, float16 scale, value = q·scale, q in −127..127.

The layout of llama.cpp's Q8_0 block (fp16 d, 32 int8), so GGUF Q8_0 tensors import
losslessly: the stored values dequantize bit for bit as `gguf` dequantizes them. The scale
minimises the weighted squared error (fmc.quant.search; llama.cpp takes absmax/127)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fmc.quant import search
from fmc.quant.packing import check_groups, grouped, split_ggml_blocks
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

if TYPE_CHECKING:
    pass

GROUP = 32
LEVELS = 127
Q8_0_BLOCK_BYTES = 2 + GROUP


class Int8(QuantScheme):
    name = "q8f16"
    compute_dtype = "float16"
    bits_per_weight = 8 + 16 / GROUP
    description = f"symmetric int8, group {GROUP}, float16 scales (the GGUF Q8_0 layout)"
    gguf_types = ("Q8_0",)
    block_size = GROUP

    def storage(self, shape, tensor):
        check_groups(shape, GROUP, tensor, self.name)
        rows, k = shape
        return [StorageTensor("q_weight", (rows, k), "int8"),
                StorageTensor("q_scale", (rows, k // GROUP), "float16")]

    def quantize(self, weight, importance=None):
        blocks, w = search.weighted_blocks(weight, GROUP, importance)
        scales = search.symmetric(blocks, w, -LEVELS, LEVELS).astype(np.float16)
        codes = search.codes_for(blocks, scales, -LEVELS, LEVELS)
        return [codes.astype(np.int8).reshape(weight.shape), scales]

    def dequantize(self, stored):
        codes, scales = stored
        values = grouped(codes.astype(np.float32), GROUP) * scales.astype(np.float32)[..., None]
        return values.reshape(codes.shape)

    def dequantize_te(self, stored, out_dtype):
        from tvm import te

        codes, scales = stored
        return te.compute(
            codes.shape,
            lambda i, j: codes[i, j].astype(out_dtype) * scales[i, j // GROUP].astype(out_dtype),
            name="dequantize")

    def from_gguf(self, type_name, blocks, shape):
        """GGUF Q8_0 rows [rows, K/32 × 34 bytes] → (int8 codes, fp16 scales)."""
        scales, payload = split_ggml_blocks(blocks, shape, GROUP, Q8_0_BLOCK_BYTES)
        return [np.ascontiguousarray(payload).view(np.int8).reshape(shape), scales]


register(Int8())
