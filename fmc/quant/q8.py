"""q8f16: symmetric int8, group 32, float16 scale = absmax/127, value = q·scale.

Identical to llama.cpp's Q8_0 block (fp16 d, 32 int8), so GGUF Q8_0 tensors import
losslessly: the stored values dequantize bit for bit as `gguf` dequantizes them."""

from __future__ import annotations

import numpy as np
from tvm import te

from fmc.quant.packing import (
    absmax_scales,
    check_groups,
    divide_by_scales,
    grouped,
    split_ggml_blocks,
)
from fmc.quant.registry import register
from fmc.quant.scheme import QuantScheme, StorageTensor

GROUP = 32
LEVELS = 127
Q8_0_BLOCK_BYTES = 2 + GROUP


class Int8(QuantScheme):
    name = "q8f16"
    compute_dtype = "float16"
    bits_per_weight = 8 + 16 / GROUP
    description = f"symmetric int8, group {GROUP}, float16 absmax/127 scales (= GGUF Q8_0)"
    gguf_types = ("Q8_0",)

    def storage(self, shape, tensor):
        check_groups(shape, GROUP, tensor, self.name)
        rows, k = shape
        return [StorageTensor("q_weight", (rows, k), "int8"),
                StorageTensor("q_scale", (rows, k // GROUP), "float16")]

    def quantize(self, weight):
        scales = absmax_scales(weight, GROUP, LEVELS, "float16")
        scaled = divide_by_scales(weight, scales, GROUP)
        codes = np.clip(np.rint(scaled), -LEVELS, LEVELS).astype(np.int8)
        return [codes.reshape(weight.shape), scales]

    def dequantize(self, stored):
        codes, scales = stored
        values = grouped(codes.astype(np.float32), GROUP) * scales.astype(np.float32)[..., None]
        return values.reshape(codes.shape)

    def dequantize_te(self, stored, out_dtype):
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
