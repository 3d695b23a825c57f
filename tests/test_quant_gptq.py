"""GPTQ (q4gB-gptq): lower layer-output error than RTN/clip on correlated inputs, equal to a naive
textbook OBS-style implementation written here, deterministic, plain q4gB storage."""

from __future__ import annotations

import numpy as np
import pytest

from cellm.errors import QuantizationError
from cellm.quant.clip import clip_scales, codes_for, quantize_clip
from cellm.quant.groupwise import pack_groupwise
from cellm.quant.gptq import GPTQ_ALPHAS, gptq_quantize
from cellm.quant.schemes import dequantize_parts, get_scheme


def _problem(n=96, k=128, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    a = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((4 * k, k)) @ a) * np.exp(rng.standard_normal(k))
    h = (x.T @ x / len(x)).astype(np.float32)
    return w, h


def _out_err(w, dq, h):
    d = (dq - w).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


def test_lower_output_error_than_rtn_and_clip():
    w, h = _problem()
    g = get_scheme("q4g32-gptq")
    parts = g.quantize(w, hessian=h)
    dq = g.dequantize(parts, w.shape)
    np.testing.assert_array_equal(dq, dequantize_parts("q4g32", parts, w.shape))
    rtn = get_scheme("q4g32")
    e_rtn = _out_err(w, rtn.dequantize(rtn.quantize(w), w.shape), h)
    e_clip = _out_err(w, get_scheme("q4g32-clip").dequantize(quantize_clip(w, 32, np.diag(h)), w.shape), h)
    e_gptq = _out_err(w, dq, h)
    assert e_gptq < 0.6 * e_rtn and e_gptq < 0.8 * e_clip


def _naive_gptq(w, h, block, damp=0.01):
    """Textbook OBS/GPTQ: quantize column i, push its error onto later columns via the inverse
    Hessian, then remove column i from the inverse (Schur complement). RTN group ranges taken from
    the updated weights when a group starts."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64) + np.eye(h.shape[0]) * damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    n, k = w.shape
    codes = np.zeros((n, k), dtype=np.int64)
    for i in range(k):
        if i % block == 0:
            seg = w[:, i:i + block]
            lo = np.minimum(seg.min(1), 0)
            hi = np.maximum(seg.max(1), 0)
            s = ((hi - lo) / 15).astype(np.float32).astype(np.float16).astype(np.float64)
            s[s == 0] = 1
            z = np.clip(np.rint(-lo / s), 0, 15)
        q = np.clip(np.rint(w[:, i] / s + z), 0, 15)
        codes[:, i] = q
        err = (w[:, i] - (q - z) * s) / hinv[i, i]
        w[:, i + 1:] -= np.outer(err, hinv[i, i + 1:])
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def test_matches_naive_textbook_gptq():
    w, h = _problem(n=40, k=64, seed=2)
    codes, _, _ = gptq_quantize(w, h, 32, clip=False)
    ref = _naive_gptq(w, h, 32)
    assert (codes[:, :64] == ref).mean() > 0.98


def test_identity_hessian_reduces_to_clip_rounding():
    w, _ = _problem(n=32, k=64, seed=3)
    h = np.eye(64, dtype=np.float32)
    parts = get_scheme("q4g32-gptq").quantize(w, hessian=h)
    sc, zp = clip_scales(w, 32, importance=np.ones(64, np.float32), alphas=GPTQ_ALPHAS)
    ref = pack_groupwise(codes_for(w, 32, sc, zp), sc, zp, 32)
    for k in ref:
        np.testing.assert_array_equal(parts[k], ref[k])


def test_deterministic_and_needs_hessian():
    w, h = _problem(n=64, k=96, seed=4)  # K=96 with block 64: padding path
    g = get_scheme("q4g64-gptq")
    a, b = g.quantize(w, hessian=h), g.quantize(w.copy(), hessian=h.copy())
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()
    with pytest.raises(QuantizationError, match="calibration"):
        g.quantize(w)
    with pytest.raises(QuantizationError, match="Hessian shape"):
        g.quantize(w, hessian=np.eye(10, dtype=np.float32))


def test_dead_inputs_do_not_break_it():
    w, h = _problem(n=16, k=64, seed=5)
    h[5, :] = 0
    h[:, 5] = 0
    dq = get_scheme("q4g32-gptq").dequantize(get_scheme("q4g32-gptq").quantize(w, hessian=h), w.shape)
    assert np.isfinite(dq).all()


def test_symmetric_variant_keeps_the_sym_grid_and_beats_rtn_sym():
    """q4g32-gptq-sym: plain symmetric q4g32 storage (no .qzero, zero point 8: onnxruntime's fast
    symmetric kernels) with lower layer-output error than symmetric RTN; deterministic."""
    w, h = _problem(seed=3)
    g = get_scheme("q4g32-gptq-sym")
    parts = g.quantize(w, hessian=h)
    assert ".qzero" not in parts and sorted(parts) == ["", ".qscale"]
    assert [s.name for s in g.specs("w", w.shape)] == ["w", "w.qscale"]
    dq = g.dequantize(parts, w.shape)
    np.testing.assert_array_equal(dq, dequantize_parts("q4g32", parts, w.shape))  # reader path: no .qzero -> zp 8
    rtn = get_scheme("q4g32-sym")
    e_rtn = _out_err(w, rtn.dequantize(rtn.quantize(w), w.shape), h)
    assert _out_err(w, dq, h) < 0.6 * e_rtn
    again = g.quantize(w, hessian=h)
    assert all(np.array_equal(again[k], parts[k]) for k in parts)
    # every block's values lie on its symmetric grid s*(q-8), q in 0..15
    s = parts[".qscale"].astype(np.float32)
    q = dq.reshape(w.shape[0], -1, 32) / s[:, :, None]
    assert np.allclose(q, np.rint(q), atol=1e-3) and q.min() >= -8 - 1e-3 and q.max() <= 7 + 1e-3
