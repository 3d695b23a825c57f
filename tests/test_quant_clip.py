"""Per-group clipping search (q4gB-clip): same storage as RTN q4gB, never worse than RTN, and the
chosen range is the best of its grid (checked against a brute-force loop written here)."""

from __future__ import annotations

import numpy as np
import pytest

from cellm.errors import QuantizationError
from cellm.quant.clip import ALPHAS, clip_scales, quantize_clip
from cellm.quant.schemes import dequantize_parts, get_scheme


def _heavy(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    w[rng.random((n, k)) < 0.02] *= 10  # outliers, as in real LLM weights
    return w


@pytest.mark.parametrize("block", [32, 64, 128])
def test_storage_matches_rtn_layout_and_generic_dequant(block):
    w = _heavy(48, 200, seed=block)  # K not a multiple of the block: padding path
    clip, rtn = get_scheme(f"q4g{block}-clip"), get_scheme(f"q4g{block}")
    assert clip.dtype == rtn.dtype == f"q4g{block}"
    parts = clip.quantize(w)
    ref = rtn.quantize(w)
    assert set(parts) == set(ref)
    for k in ref:
        assert parts[k].shape == ref[k].shape and parts[k].dtype == ref[k].dtype
    specs = clip.specs("t", w.shape)
    assert [s.nbytes for s in specs] == [s.nbytes for s in rtn.specs("t", w.shape)]
    dq = clip.dequantize(parts, w.shape)
    np.testing.assert_array_equal(dq, dequantize_parts(f"q4g{block}", parts, w.shape))
    assert np.abs(dq - w).max(axis=1).max() <= clip.error_bound(w).max()


def test_never_worse_than_rtn_and_deterministic():
    w = _heavy(256, 640, seed=1)
    clip, rtn = get_scheme("q4g32-clip"), get_scheme("q4g32")
    e_clip = ((clip.dequantize(clip.quantize(w), w.shape) - w) ** 2).sum()
    e_rtn = ((rtn.dequantize(rtn.quantize(w), w.shape) - w) ** 2).sum()
    assert e_clip < 0.97 * e_rtn
    a, b = clip.quantize(w), clip.quantize(w.copy())
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()


def _brute_best(block_vals, wt):
    """Best error over the same alpha grid, by explicit loops (independent of the vectorised code)."""
    best = np.inf
    lo0, hi0 = min(block_vals.min(), 0.0), max(block_vals.max(), 0.0)
    for a in ALPHAS:
        lo, hi = lo0 * a, hi0 * a
        s = float(np.float16((hi - lo) / 15.0)) or 1.0
        zp = min(max(round(-lo / s), 0), 15)
        err = 0.0
        for x, c in zip(block_vals, wt):
            q = min(max(np.rint(x / s + zp), 0), 15)
            err += c * (x - (q - zp) * s) ** 2
        best = min(best, err)
    return best


def test_each_block_at_least_as_good_as_brute_force_grid():
    w = _heavy(6, 64, seed=3)
    rng = np.random.default_rng(4)
    imp = rng.random(64).astype(np.float32) * 3
    scales, zeros = clip_scales(w, 32, importance=imp)
    for r in range(w.shape[0]):
        for g in range(2):
            x = w[r, g * 32:(g + 1) * 32].astype(np.float64)
            c = imp[g * 32:(g + 1) * 32].astype(np.float64)
            s = float(scales[r, g])
            zp = float(zeros[r, g])
            q = np.clip(np.rint(x / s + zp), 0, 15)
            err = float((c * (x - (q - zp) * s) ** 2).sum())
            assert err <= _brute_best(x, c) * (1 + 1e-4) + 1e-12


def test_importance_weighting_lowers_weighted_error():
    w = _heavy(128, 256, seed=5)
    rng = np.random.default_rng(6)
    imp = np.exp(2 * rng.standard_normal(256)).astype(np.float32)
    plain = quantize_clip(w, 32)
    weighted = quantize_clip(w, 32, importance=imp)
    s = get_scheme("q4g32-clip")
    e = lambda p: float((((s.dequantize(p, w.shape) - w) ** 2) * imp).sum())  # noqa: E731
    assert e(weighted) < e(plain)


def test_bad_input_rejected():
    w = _heavy(4, 64)
    w[1, 3] = np.nan
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_clip(w, 32)
    with pytest.raises(QuantizationError, match="importance"):
        quantize_clip(_heavy(4, 64), 32, importance=np.ones(10))
    with pytest.raises(QuantizationError, match="block size"):
        quantize_clip(_heavy(4, 64), 16)
