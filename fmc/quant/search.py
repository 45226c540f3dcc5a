"""Error-minimising scales: for every block of weights, the scale (and minimum) that minimise
the importance-weighted squared error of the block's dequantized values.

The method follows ggml's reference quantizers (`make_qx_quants`, `make_qkx2_quants`,
`make_qp_quants`): try a fan of candidate scales around the absmax one, round the block with
each, solve the weighted least-squares problem for the scale (and minimum) given those codes,
and keep the candidate with the lowest error. Here every function works on all blocks of a
tensor at once (numpy arrays [blocks, n]), and the winner is refined by re-rounding with its
own scale until the codes stop changing. Storage layouts and kernels do not depend on any of
this: only which codes and scales get stored.

`importance` (optional, from `--calib`) is the mean x² of the activations entering each input
channel; without it every channel counts the same."""

from __future__ import annotations

import numpy as np

# Candidate inverse scales: nmax + STEP·i for i in [-STEPS, STEPS] (ggml tries 19 or 21).
STEPS = 9
STEP = 0.1
# Re-round with the best scale and re-fit, at most this many times.
REFINE = 2
# False: plain absmax scales, no search (the ablation the tests use).
ENABLED = True


def element_weights(blocks: np.ndarray, importance: np.ndarray | None,
                    square: bool = False) -> np.ndarray:
    """How much each weight's error counts, [..., n] like `blocks`.

    Without calibration ggml's choice for its K-quants: rms(block) + |x| (big weights matter
    more, small ones are not ignored) — or, with `square`, x² (ggml's make_qx_quants; what
    the NF4 code book, whose levels crowd near zero, measured best with). With calibration
    (per-element activation energy, broadcast to `blocks`) llama.cpp's imatrix form:
    importance · sqrt(σ² + x²), σ² the mean square of the block."""
    squares = blocks * blocks
    if importance is None and square:
        return squares
    if importance is None:
        return np.sqrt(squares.mean(axis=-1, keepdims=True)) + np.abs(blocks)
    sigma2 = squares.mean(axis=-1, keepdims=True)
    return importance * np.sqrt(sigma2 + squares)


def _fit_scale(wx, w, grid):
    """Weighted least-squares scale for fixed grid values: argmin_s Σ w (x − s·g)², given
    wx = w·x. Returns (scale, error reduction Σwxg·scale — larger is better)."""
    sumlx = (wx * grid).sum(axis=-1)
    suml2 = (w * grid * grid).sum(axis=-1)
    scale = np.divide(sumlx, suml2, out=np.zeros_like(sumlx), where=suml2 > 0)
    return scale, sumlx * scale


def symmetric(x: np.ndarray, w: np.ndarray, low: int, high: int) -> np.ndarray:
    """Scale per block for values scale·l, l integer in [low, high] (low < 0 < high).
    Returns float32 scales [blocks] (0 for all-zero blocks)."""
    return grid_search(x, w, lambda y: np.clip(np.rint(y), low, high), -low, high,
                       symmetric=low == -high)


def grid_search(x: np.ndarray, w: np.ndarray, to_grid, negative_end: float,
                positive_end: float, symmetric: bool = False) -> np.ndarray:
    """Scale per block for values scale·g, g = to_grid(x / scale) a point of a fixed grid
    whose ends are −negative_end and +positive_end (an integer range, or a code book).

    Candidates put the block's signed extreme on the grid's negative end and — unless the
    grid is `symmetric` (then both give the same codes) — on its positive end, each stretched
    by STEP·i for i in [−STEPS, STEPS]; each is refit by least squares; the best is refined
    by re-rounding. The scale's sign says which end was chosen. Returns float32 [blocks]."""
    index = np.abs(x).argmax(axis=-1)[..., None]
    signed_max = np.take_along_axis(x, index, axis=-1)[..., 0]
    safe_max = np.where(signed_max == 0, 1.0, signed_max).astype(np.float32)
    # Plain absmax: the signed extreme onto the grid's negative end (llama.cpp's Q4_0 rule:
    # d = max / −8 uses all 16 levels of an asymmetric range).
    best_scale = (-signed_max / negative_end).astype(np.float32)
    if not ENABLED:
        return np.where(signed_max == 0, 0.0, best_scale).astype(np.float32)
    wx = w * x
    best_score = np.full(x.shape[:-1], -np.inf, dtype=np.float32)

    def consider(inverse):
        nonlocal best_scale, best_score
        scale, score = _fit_scale(wx, w, to_grid(x * inverse[..., None]))
        better = score > best_score
        best_scale = np.where(better, scale, best_scale)
        best_score = np.where(better, score, best_score)
        return better.any()

    landings = [-negative_end] + ([] if symmetric else [positive_end])
    for end in landings:
        for step in range(-STEPS, STEPS + 1):
            reach = end + (STEP * step if end > 0 else -STEP * step)
            consider((reach / safe_max).astype(np.float32))
    for _ in range(REFINE):
        inverse = np.divide(1.0, best_scale, out=np.zeros_like(best_scale),
                            where=best_scale != 0)
        if not consider(inverse):
            break
    return np.where(signed_max == 0, 0.0, best_scale).astype(np.float32)


def affine(x: np.ndarray, w: np.ndarray, nmax: int, nonpositive_min: bool,
           rmin: float = -1.0, rdelta: float = 0.1, nstep: int = 20
           ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, minimum) per block for values scale·l + minimum, l integer in [0, nmax].

    ggml's make_qkx2_quants: candidate inverse scales (nmax + rmin + rdelta·i)/(max − min),
    each solved as a 2×2 weighted least-squares problem for scale and minimum. K-quants keep
    the minimum ≤ 0 (`nonpositive_min`: it is stored as an unsigned amount subtracted);
    Q4_1/Q5_1 store it as a signed float16 and need no clamp."""
    low = x.min(axis=-1)
    high = x.max(axis=-1)
    if nonpositive_min:
        low = np.minimum(low, 0.0)
    spread = high - low
    flat = spread <= 0
    spread = np.where(flat, 1.0, spread)
    scale = spread / nmax
    minimum = low
    codes = np.clip(np.rint((x - low[..., None]) / scale[..., None]), 0, nmax)
    best_error = (w * (scale[..., None] * codes + minimum[..., None] - x) ** 2).sum(axis=-1)
    if ENABLED:
        sum_w = w.sum(axis=-1)
        wx = w * x
        sum_x = wx.sum(axis=-1)
        for step in range(nstep + 1):
            inverse = (rmin + rdelta * step + nmax) / spread
            levels = np.clip(np.rint(inverse[..., None] * (x - low[..., None])), 0, nmax)
            sum_l = (w * levels).sum(axis=-1)
            sum_l2 = (w * levels * levels).sum(axis=-1)
            sum_xl = (wx * levels).sum(axis=-1)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            safe = np.where(ok, det, 1.0)
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
            if nonpositive_min:
                positive = this_min > 0
                this_scale = np.where(positive, np.divide(
                    sum_xl, sum_l2, out=np.zeros_like(sum_xl), where=sum_l2 > 0), this_scale)
                this_min = np.where(positive, 0.0, this_min)
            error = (w * (this_scale[..., None] * levels + this_min[..., None] - x) ** 2
                     ).sum(-1)
            better = ok & (error < best_error)
            scale = np.where(better, this_scale, scale)
            minimum = np.where(better, this_min, minimum)
            best_error = np.where(better, error, best_error)
    scale = np.where(flat, 0.0, scale)
    minimum = np.where(flat, low, minimum)
    return scale.astype(np.float32), minimum.astype(np.float32)


def positive_levels(values: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """Super-block scale d for non-negative values ≈ d·l, l integer in [0, nmax]: how the
    K-quants store their sub-block scales and minimums in 6 bits (ggml's make_qp_quants).
    `values`, `w`: [blocks, n]; returns float32 d [blocks]."""
    top = values.max(axis=-1)
    safe = np.where(top > 0, top, 1.0)
    best = safe / nmax
    if ENABLED:
        best_error = np.full(top.shape, np.inf)
        for step in range(-4, 5):
            d = safe / (nmax + 0.1 * step)
            levels = np.minimum(np.rint(values / d[..., None]), nmax)
            error = (w * (values - d[..., None] * levels) ** 2).sum(axis=-1)
            better = error < best_error
            best = np.where(better, d, best)
            best_error = np.where(better, error, best_error)
        # Refit d for the chosen levels.
        levels = np.minimum(np.rint(values / best[..., None]), nmax)
        fitted, _ = _fit_scale(w * values, w, levels)
        best = np.where(fitted > 0, fitted, best)
    return np.where(top > 0, best, 0.0).astype(np.float32)


def codes_for(x: np.ndarray, scale: np.ndarray, low: int, high: int,
              offset: np.ndarray | float = 0.0) -> np.ndarray:
    """Nearest integer levels for the stored (rounded) scale: l = clip(round((x − offset) /
    scale), low, high), 0 where the scale is 0. Rounding against the scale that is actually
    stored (float16) is what makes each weight's error as small as the grid allows."""
    scale = scale.astype(np.float32)[..., None]
    shifted = x - offset
    ratio = np.divide(shifted, scale, out=np.zeros_like(shifted), where=scale != 0)
    return np.clip(np.rint(ratio), low, high)


def weighted_blocks(weight: np.ndarray, block: int, importance: np.ndarray | None,
                    square: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A [rows, K] weight as float32 blocks [rows, K/block, block] and their element weights
    (`element_weights`); `importance` is per input channel [K] (or None)."""
    rows, k = weight.shape
    blocks = np.asarray(weight, dtype=np.float32).reshape(rows, k // block, block)
    column = None
    if importance is not None:
        column = np.asarray(importance, dtype=np.float32).reshape(1, k // block, block)
    return blocks, element_weights(blocks, column, square).astype(np.float32)
