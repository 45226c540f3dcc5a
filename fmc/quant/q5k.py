"""q5k: llama.cpp's Q5_K — Q4_K's structure with 5-bit codes, 5.5 bits per weight
(fmc.quant.kquant).

A weight whose reduction axis is not a multiple of 256 falls back to q5_1, as llama.cpp
does."""

from fmc.quant.kquant import AffineKQuant
from fmc.quant.registry import register

register(AffineKQuant(bits=5, fallback="q5_1"))
