"""Shared helpers of the quantization schemes: input checks, row chunking, f16 scale rounding."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from cellm.errors import QuantizationError

F16_MAX = np.float32(65504.0)
# Work on row slices of about this many elements so temporaries stay in the CPU cache.
CHUNK_ELEMENTS = 1 << 15


def as_f32_2d(w: np.ndarray, scheme: str) -> np.ndarray:
    """The weight as a C-contiguous float32 2-D array (no copy when it already is one)."""
    a = np.asarray(w)
    if a.ndim != 2:
        raise QuantizationError(
            f"scheme {scheme} quantizes 2-D weights, got shape {list(a.shape)}"
        )
    if a.dtype != np.float32:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise QuantizationError(f"scheme {scheme}: unsupported input dtype {a.dtype}")
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def raise_nonfinite(w: np.ndarray, scheme: str) -> None:
    """Raise QuantizationError naming how many NaN/Inf values ``w`` holds and the first index."""
    bad = ~np.isfinite(w)
    count = int(bad.sum())
    if count == 0:  # pragma: no cover - only called when a reduction saw NaN/Inf
        return
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.reshape(-1))), w.shape))
    value = w[first]
    raise QuantizationError(
        f"scheme {scheme}: input holds {count} non-finite value(s) (NaN/Inf); first at index "
        f"{list(first)} = {value!r}"
    )


def row_minmax(w: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row max and min (float32); NaN/Inf anywhere raises QuantizationError."""
    if w.shape[1] == 0:
        raise QuantizationError(f"scheme {scheme}: rows of length 0 (shape {list(w.shape)})")
    mx = w.max(axis=1)
    mn = w.min(axis=1)
    if not (np.isfinite(mx).all() and np.isfinite(mn).all()):
        raise_nonfinite(w, scheme)
    return mx, mn


def chunk_rows(cols: int, target: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a chunk holds about ``target`` elements (at least one row)."""
    return max(1, target // max(1, cols))


def row_chunks(rows: int, cols: int, target: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    step = chunk_rows(cols, target)
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


def f16_scales(scale: np.ndarray, scheme: str, round_up: bool = False) -> np.ndarray:
    """float32 scales -> float16; ``round_up`` makes |f16| >= |f32| (keeps error bounds exact)."""
    s16 = scale.astype(np.float16)
    if not np.isfinite(s16).all():
        idx = int(np.argmax(~np.isfinite(s16).reshape(-1)))
        raise QuantizationError(
            f"scheme {scheme}: scale {float(scale.reshape(-1)[idx])!r} at index {idx} "
            f"overflows float16 (max {float(F16_MAX)})"
        )
    if round_up:
        low = np.abs(s16.astype(np.float32)) < np.abs(scale)
        if low.any():
            s16[low] = np.nextafter(s16[low], np.copysign(np.float16(np.inf), s16[low]))
            if not np.isfinite(s16).all():
                raise QuantizationError(f"scheme {scheme}: a scale overflows float16 (max 65504)")
    return s16
