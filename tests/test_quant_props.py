"""Property tests: for any finite float32 matrix every RTN scheme either raises QuantizationError
(e.g. a scale beyond float16) or round-trips within its error bound, with storage of the declared
size; row slices quantize independently."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellm.errors import QuantizationError
from cellm.quant.schemes import get_scheme

RTN = ["f16", "i8", "i4", "q4g32", "q4g32-sym", "q4g64", "q4g128-sym"]

finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate = st.floats(min_value=-1e4, max_value=1e4, width=32, allow_nan=False)
matrices = st.tuples(st.integers(1, 4), st.integers(1, 150)).flatmap(
    lambda s: hnp.arrays(np.float32, s, elements=st.one_of(moderate, finite, st.just(0.0)))
)


@pytest.mark.parametrize("scheme", RTN)
@settings(max_examples=40, deadline=None)
@given(w=matrices)
def test_round_trip_within_bound_or_refused(scheme, w):
    sc = get_scheme(scheme)
    try:
        parts = sc.quantize(w)
    except QuantizationError as exc:
        assert "float16" in str(exc)  # the only legitimate refusal for finite input
        return
    specs = sc.specs("t", w.shape)
    for spec in specs:
        assert parts[spec.name[1:]].nbytes == spec.nbytes
    deq = sc.dequantize(parts, w.shape)
    assert deq.shape == w.shape and deq.dtype == np.float32 and np.isfinite(deq).all()
    err = np.abs(deq.astype(np.float64) - w.astype(np.float64)).max(axis=1)
    bound = np.asarray(sc.error_bound(w), dtype=np.float64)
    assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("scheme", RTN)
@pytest.mark.parametrize("shape", [(0, 70), (3, 1), (1, 1), (2, 129)])
def test_degenerate_shapes(scheme, shape):
    sc = get_scheme(scheme)
    w = np.full(shape, -0.75, np.float32)
    parts = sc.quantize(w)
    for spec in sc.specs("t", shape):
        assert parts[spec.name[1:]].nbytes == spec.nbytes
    deq = sc.dequantize(parts, shape)
    assert deq.shape == shape
    if w.size:
        assert (np.abs(deq - w).max(axis=1) <= sc.error_bound(w)).all()
