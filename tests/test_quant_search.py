"""The error-minimising scale search (fmc.quant.search): it beats absmax scales, it uses the
calibration's importance, and its building blocks solve what they claim to."""

from __future__ import annotations

import numpy as np
import pytest

from fmc.quant import get, search


def heavy_tailed(rows=64, k=512, seed=1):
    """Student-t (3 degrees of freedom): a few large weights per group, as trained LLM weights
    have — where absmax scales waste most levels."""
    return np.random.default_rng(seed).standard_t(3, size=(rows, k)).astype(np.float32) * 0.02


def squared_error(name, w, importance=None, measure=None):
    """Σ measure·(dequantize(quantize(w, importance)) − w)² over the tensor (measure: 1
    unless given)."""
    scheme = get(name)
    stored = scheme.quantize(w) if importance is None else scheme.quantize(w, importance)
    error = (scheme.dequantize(stored) - w) ** 2
    return float((error * (1 if measure is None else measure)).sum())


@pytest.mark.parametrize("name", ["q4f16", "q4f32", "q4_0", "nf4", "q8f16", "q4_1", "q5_0",
                                  "q5_1", "q4k", "q5k", "q6k"])
def test_search_beats_absmax_on_heavy_tails(name, monkeypatch):
    """Fails when the search is disabled: the same quantizer with absmax scales (the
    `search.ENABLED = False` ablation) must lose by a margin."""
    w = heavy_tailed()
    # The error each search minimises: nf4 weights it by x² (its chosen objective), the
    # others count every weight alike here.
    measure = w * w if name == "nf4" else None
    searched = squared_error(name, w, measure=measure)
    monkeypatch.setattr(search, "ENABLED", False)
    absmax = squared_error(name, w, measure=measure)
    assert searched < 0.97 * absmax, (searched, absmax)  # measured 0.74–0.96


def test_importance_moves_the_error_to_unimportant_columns():
    """With per-column importance the quantizer trades error on unimportant input channels
    for less error where the activations are large (what --calib provides)."""
    w = heavy_tailed()
    importance = np.ones(w.shape[1], dtype=np.float32)
    importance[::4] = 50.0  # every 4th input channel carries most activation energy
    for name in ("q4f16", "q4k", "q4_1"):
        plain = squared_error(name, w, measure=importance)
        weighted = squared_error(name, w, importance, measure=importance)
        assert weighted < 0.95 * plain, (name, weighted, plain)


def test_symmetric_least_squares_scale_is_optimal_for_its_codes():
    """For the codes it returns, the chosen scale is the weighted least-squares one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    w = search.element_weights(x, None)
    scale = search.symmetric(x, w, -8, 7)
    codes = search.codes_for(x, scale, -8, 7)
    for delta in (0.97, 1.03):
        worse = (w * (x - scale[:, None] * delta * codes) ** 2).sum(-1)
        best = (w * (x - scale[:, None] * codes) ** 2).sum(-1)
        assert (best <= worse + 1e-6).mean() > 0.99


def test_affine_fit_reproduces_an_affine_grid_exactly():
    """Weights that already lie on a 4-bit affine grid (a Q4_1 checkpoint's) are found again
    exactly — why requantizing the shipped Q4_1 model with q4_1 loses nothing."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (100, 32)).astype(np.float32)
    codes[:, 0], codes[:, 1] = 0, 15  # every level range used
    d = rng.uniform(0.01, 0.1, (100, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1, 0, (100, 1)).astype(np.float16).astype(np.float32)
    x = codes * d + m
    q41 = get("q4_1")
    np.testing.assert_array_equal(q41.dequantize(q41.quantize(x.reshape(100, 32))), x)


def test_all_zero_blocks_stay_zero():
    w = np.zeros((16, 256), dtype=np.float32)
    for name in ("q4f16", "q4_0", "q4_1", "q5_0", "q5_1", "nf4", "q8f16", "q4k", "q5k", "q6k"):
        scheme = get(name)
        assert not scheme.dequantize(scheme.quantize(w)).any(), name
