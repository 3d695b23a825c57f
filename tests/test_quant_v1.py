"""cellm v1 schemes (f16, i8, i4): bit-exactness against an independent reference written here,
round trips, error bounds, nibble order and NaN/Inf rejection."""

from __future__ import annotations

import numpy as np
import pytest

from cellm.errors import QuantizationError
from cellm.quant.bitpack import pack_nibbles, unpack_nibbles
from cellm.quant.schemes import get_scheme
from cellm.quant.v1 import round_half_away


def reference_rowwise(w: np.ndarray, qmax: int):
    """Straightforward per-element loop with float32 scalars, as the upstream notes state it."""
    rows, cols = w.shape
    q = np.zeros((rows, cols), dtype=np.int64)
    scales16 = np.zeros(rows, dtype=np.float16)
    for r in range(rows):
        m = np.float32(0.0)
        for c in range(cols):
            m = max(m, np.float32(abs(w[r, c])))
        scale = np.float32(m / np.float32(qmax))
        if scale == 0:  # all-zero row (or an all-subnormal row whose scale underflows)
            scale = np.float32(1.0)
        for c in range(cols):
            x = np.float32(w[r, c] / scale)  # f32 division
            a = abs(float(x))
            v = int(np.floor(a + 0.5)) if a != np.floor(a) + 0.5 else int(np.floor(a)) + 1
            v = -v if x < 0 else v
            q[r, c] = min(qmax, max(-qmax, v))
        scales16[r] = np.float16(scale)
    return q, scales16


def data_with_ties(rows: int, cols: int, qmax: int, seed: int) -> np.ndarray:
    """Random rows where many elements are exact k+0.5 multiples of the row scale."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    for r in range(rows):
        if r % 2 == 0:
            # row max is qmax * 2^-e so scale is a power of two and w/scale hits .5 exactly
            scale = np.float32(2.0 ** -int(rng.integers(0, 6)))
            k = rng.integers(-qmax, qmax, size=cols).astype(np.float32)
            w[r] = (k + np.float32(0.5)) * scale
            w[r, 0] = qmax * scale
    w[-1] = 0.0  # all-zero row: scale 1.0
    return w


@pytest.mark.parametrize("scheme, qmax", [("i8", 127), ("i4", 7)])
@pytest.mark.parametrize("cols", [1, 7, 64])
def test_bit_exact_against_reference(scheme, qmax, cols):
    w = data_with_ties(9, cols, qmax, seed=cols)
    parts = get_scheme(scheme).quantize(w)
    q_ref, s_ref = reference_rowwise(w, qmax)
    assert parts[".qscale"].dtype == np.float16 and parts[".qscale"].shape == (9,)
    np.testing.assert_array_equal(parts[".qscale"].view(np.uint16), s_ref.view(np.uint16))
    if scheme == "i8":
        assert parts[""].dtype == np.int8 and parts[""].shape == (9, cols)
        np.testing.assert_array_equal(parts[""].astype(np.int64), q_ref)
    else:
        assert parts[""].dtype == np.uint8 and parts[""].shape == (9, (cols + 1) // 2)
        for r in range(9):  # independent byte assembly
            for b in range((cols + 1) // 2):
                lo = q_ref[r, 2 * b] + 8
                hi = q_ref[r, 2 * b + 1] + 8 if 2 * b + 1 < cols else 8
                assert parts[""][r, b] == lo | (hi << 4), (r, b)
    # dequant is q * f16(scale)
    deq = get_scheme(scheme).dequantize(parts, w.shape)
    np.testing.assert_array_equal(deq, (q_ref * s_ref.astype(np.float32)[:, None]).astype(np.float32))


def test_ties_round_away_from_zero():
    # scale = 1 exactly (max 127): w/scale = w
    w = np.array([[127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5]], np.float32)
    q = get_scheme("i8").quantize(w)[""][0]
    assert q.tolist() == [127, 1, -1, 2, -2, 3, -3, 0, 0, 127]


def test_round_half_away_near_all_ties():
    """Every float32 within 64 ulps of each k+0.5 (|k| <= 130) against float64 floor(|x|+0.5)."""
    base = (np.arange(-131, 131) + 0.5).astype(np.float32)
    u = base.view(np.int32)[:, None] + np.arange(-64, 65, dtype=np.int32)[None, :]
    x = np.concatenate([u.reshape(-1).view(np.float32), np.float32([0.49999997, -0.49999997, 0, -0.0])])
    x64 = x.astype(np.float64)
    ref = np.sign(x64) * np.floor(np.abs(x64) + 0.5)
    np.testing.assert_array_equal(round_half_away(x.copy()), ref)


@pytest.mark.parametrize("scheme", ["i8", "i4", "f16"])
def test_round_trip_and_error_bound(scheme):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((33, 77)) * rng.uniform(1e-3, 10, size=(33, 1))).astype(np.float32)
    w[3] = 0.0
    w[4, :] = 1e-9  # tiny row: f16 scale is subnormal
    sc = get_scheme(scheme)
    parts = sc.quantize(w)
    deq = sc.dequantize(parts, w.shape)
    assert deq.dtype == np.float32 and deq.shape == w.shape
    err = np.abs(deq.astype(np.float64) - w)
    # bound computed here: |w - q*s16| <= s/2 + qmax*|s - s16| (exact arithmetic), + tiny slack
    if scheme == "f16":
        bound = np.abs(w).max(axis=1) * 2.0**-11 + 2.0**-25
    else:
        qmax = 127 if scheme == "i8" else 7
        m = np.abs(w).max(axis=1).astype(np.float64)
        s = np.where(m > 0, (m / qmax).astype(np.float32), 1.0).astype(np.float64)
        s16 = s.astype(np.float16).astype(np.float64)
        bound = np.maximum(s, s16) / 2 + qmax * np.abs(s - s16) + m * 1e-6 + 2.0**-25
    assert (err.max(axis=1) <= bound).all()
    assert (err.max(axis=1) <= sc.error_bound(w)).all()
    np.testing.assert_array_equal(deq[3], 0.0)
    # a requantize of the dequantized weights reproduces the stored values (idempotence)
    if scheme != "f16":
        again = sc.quantize(deq)
        np.testing.assert_array_equal(sc.dequantize(again, w.shape)[:3], deq[:3])


def test_rows_are_independent():
    w = np.random.default_rng(5).standard_normal((10, 33)).astype(np.float32)
    for scheme in ("i8", "i4", "q4g32", "q4g32-sym"):
        sc = get_scheme(scheme)
        whole = sc.quantize(w)
        halves = [sc.quantize(w[:4]), sc.quantize(w[4:])]
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))


@pytest.mark.parametrize("scheme", ["i8", "i4", "f16", "q4g32", "q4g64-sym"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(scheme, bad):
    w = np.ones((4, 64), np.float32)
    w[2, 5] = bad
    w[3, 1] = bad
    with pytest.raises(QuantizationError, match=r"2 non-finite value\(s\).*first at index \[2, 5\]"):
        get_scheme(scheme).quantize(w)


def test_f16_overflow_and_shapes():
    with pytest.raises(QuantizationError, match="overflow float16"):
        get_scheme("f16").quantize(np.array([1e6], np.float32))
    with pytest.raises(QuantizationError, match="must be 2-D"):
        get_scheme("i4").specs("x", (8,))
    with pytest.raises(QuantizationError, match="quantizes 2-D weights"):
        get_scheme("i8").quantize(np.ones(8, np.float32))
    with pytest.raises(QuantizationError, match="overflows float16"):
        get_scheme("i8").quantize(np.full((1, 4), 1e9, np.float32))
    x = np.array([0.1, 1 / 3, 65504.0, 1e-8], np.float32)
    np.testing.assert_array_equal(get_scheme("f16").quantize(x)[""], x.astype(np.float16))


def test_unknown_scheme_lists_known():
    with pytest.raises(QuantizationError, match=r"unknown quantization scheme 'i3'; known: f16, i4, i8, q4g128"):
        get_scheme("i3")


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_bitpack_round_trip_and_order(n):
    u = np.random.default_rng(n).integers(0, 16, size=(3, n)).astype(np.uint8)
    p = pack_nibbles(u, pad=8)
    assert p.shape == (3, (n + 1) // 2)
    for i in range(n):
        byte = p[:, i // 2]
        got = byte & 15 if i % 2 == 0 else byte >> 4
        np.testing.assert_array_equal(got, u[:, i])
    if n % 2:
        np.testing.assert_array_equal(p[:, -1] >> 4, 8)
    np.testing.assert_array_equal(unpack_nibbles(p, n), u)
    assert pack_nibbles(np.array([1, 2], np.uint8)).tolist() == [0x21]
    with pytest.raises(QuantizationError):
        unpack_nibbles(p, n + 2)


@pytest.mark.parametrize("scheme, qmax", [("i8", 127), ("i4", 7)])
def test_subnormal_rows_clamp_like_reference(scheme, qmax):
    """With subnormal f32 scales w/scale can exceed qmax+0.5: the clamp must apply; a scale that
    underflows to 0 becomes 1.0."""
    tiny = np.float32(2.0**-149)
    w = np.array([[15 * tiny, 14 * tiny, -15 * tiny, tiny],
                  [190 * tiny, -189 * tiny, 3 * tiny, 0]], dtype=np.float32)
    parts = get_scheme(scheme).quantize(w)
    q_ref, s_ref = reference_rowwise(w, qmax)
    deq = get_scheme(scheme).dequantize(parts, w.shape)
    np.testing.assert_array_equal(deq, (q_ref * s_ref.astype(np.float32)[:, None]).astype(np.float32))
    if scheme == "i8":
        np.testing.assert_array_equal(parts[""], q_ref)
    assert np.abs(q_ref).max() == qmax  # 190/1 (i8) and 15/2 (i4) hit the clamp
