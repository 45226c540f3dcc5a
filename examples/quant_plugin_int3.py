"""An fmc quantization plugin in one file: `int3`, symmetric 3-bit, group 32.

Use it with:  fmc compile MODEL --quant-plugin examples/quant_plugin_int3.py --quant int3 -o OUT

Codes q = clamp(round(w/scale) + 3, 0, 6) with scale = absmax/3 in float16, value (q − 3)·scale.
For clarity each code is stored in its own uint8 (a real scheme would pack them); the
dequantize expression is what fmc fuses into the consuming matmul.
"""

import numpy as np
from tvm import te

import fmc.quant
from fmc.errors import InputError

GROUP = 32
LEVELS = 3


class Int3(fmc.quant.QuantScheme):
    name = "int3"
    description = "symmetric 3-bit (one code per uint8), group 32, float16 absmax/3 scales"
    compute_dtype = "float16"
    bits_per_weight = 8 + 16 / GROUP

    def storage(self, shape, tensor):
        rows, k = shape
        if k % GROUP:
            raise InputError(f"tensor {tensor!r}: reduction dimension {k} is not a multiple "
                             f"of int3's group size {GROUP}")
        return [fmc.quant.StorageTensor("q_weight", (rows, k), "uint8"),
                fmc.quant.StorageTensor("q_scale", (rows, k // GROUP), "float16")]

    def quantize(self, weight):
        rows, k = weight.shape
        groups = weight.reshape(rows, k // GROUP, GROUP)
        scales = (np.abs(groups).max(axis=-1) / LEVELS).astype(np.float16)
        divisor = scales.astype(np.float32)[..., None]
        scaled = np.divide(groups, divisor, out=np.zeros_like(groups), where=divisor != 0)
        codes = np.clip(np.rint(scaled) + LEVELS, 0, 2 * LEVELS).astype(np.uint8)
        return [codes.reshape(rows, k), scales]

    def dequantize(self, stored):
        codes, scales = stored
        rows, k = codes.shape
        values = (codes.astype(np.float32) - LEVELS).reshape(rows, k // GROUP, GROUP)
        return (values * scales.astype(np.float32)[..., None]).reshape(rows, k)

    def dequantize_te(self, stored, out_dtype):
        codes, scales = stored
        return te.compute(
            codes.shape,
            lambda i, j: (codes[i, j].astype(out_dtype) - LEVELS)
            * scales[i, j // GROUP].astype(out_dtype),
            name="dequantize")


fmc.quant.register(Int3())
