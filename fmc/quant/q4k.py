"""q4k: llama.cpp's Q4_K — 4-bit codes in super-blocks of 256 (eight sub-blocks of 32, 6-bit
scales and minimums, float16 d and dmin), 4.5 bits per weight (fmc.quant.kquant).

A weight whose reduction axis is not a multiple of 256 falls back to q5_0, as llama.cpp
does."""

from fmc.quant.kquant import AffineKQuant
from fmc.quant.registry import register

register(AffineKQuant(bits=4, fallback="q5_0"))
