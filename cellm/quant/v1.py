"""The cellm v1 schemes, bit-exact to the upstream converter: ``f16``, ``i8``, ``i4``.

``i8`` / ``i4`` are per-row symmetric. For each row: ``m = max|w|`` (f32), ``scale = m/qmax`` (f32
division) or 1.0 for an all-zero row, ``q = clamp(round_half_away_from_zero(w/scale), -qmax, qmax)``
with the f32 scale (f32 division), the stored scale is ``f16(scale)``; dequant ``q * f16(scale)``.
(A row whose ``m/qmax`` underflows to 0 in f32 — only possible when every value is a subnormal below
~1e-43 — also gets scale 1.0, i.e. quantizes to zeros, instead of dividing by zero.)
qmax is 127 (i8) or 7 (i4, stored as the nibble q+8, element 2k in the low nibble, odd rows padded
with the nibble 8).

Everything is row-local, so callers may quantize any row slice independently and concatenate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellm.errors import QuantizationError
from cellm.format.constants import SCALE_SUFFIX, TensorSpec, make_spec
from cellm.quant.bitpack import unpack_nibbles
from cellm.quant.common import as_f32_2d, chunk_rows, f16_scales, raise_nonfinite, row_chunks, row_minmax

# trunc(x + copysign(HALF_DOWN, x)) == round_half_away_from_zero(x) for float32 x: checked exhaustively
# for every float32 with |x| <= 256 (quotients here are <= 1.5*qmax <= 191 in magnitude);
# adding exactly 0.5 would round 0.49999997 up to 1 (see tests/test_quant_v1.py).
HALF_DOWN = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))
F16_EPS = 2.0**-11  # relative rounding error of f32 -> f16 (normal range)
F16_TINY = 2.0**-25  # half the smallest f16 subnormal spacing
F16_OVERFLOW = np.float32(65520.0)  # f32 values >= this round to inf in f16 (65504 is the max)
_SIGN_BIT = np.uint32(0x80000000)
# Row chunks of ~128K elements (~1.4 MiB of buffers, L2/L3-resident): fewer, longer numpy calls
# measured ~20% faster than 32K-element chunks here (per-call overhead dominates small chunks).
_CHUNK_ELEMENTS = 1 << 17
_HALF_DOWN_BITS = HALF_DOWN.view(np.uint32)


def round_half_away(x: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """In-place float32 round-half-away-from-zero of ``x`` (exhaustively checked for |x| <= 256,
    which covers every use here); ``tmp`` is an optional scratch buffer of x's shape."""
    if tmp is None:
        tmp = np.empty_like(x)
    np.copysign(HALF_DOWN, x, out=tmp)
    np.add(x, tmp, out=x)
    np.trunc(x, out=x)
    return x


@dataclasses.dataclass(frozen=True)
class F16Scheme:
    name: str = "f16"
    dtype: str = "f16"

    def specs(self, tensor_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        return [make_spec(tensor_name, "f16", shape)]

    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        a = np.asarray(w)
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        if a.size:
            mx, mn = a.max(), a.min()  # NaN propagates; +-Inf and f16 overflow show here
            if not (np.isfinite(mx) and np.isfinite(mn)):
                raise_nonfinite(a, self.name)
            if mx >= F16_OVERFLOW or mn <= -F16_OVERFLOW:
                over = np.abs(a) >= F16_OVERFLOW
                idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(over.reshape(-1))), a.shape))
                raise QuantizationError(
                    f"scheme f16: {int(over.sum())} value(s) overflow float16 (max 65504); first "
                    f"at index {list(idx)} = {float(a[idx])!r}"
                )
        h = np.empty(a.shape, dtype="<f2")
        np.copyto(h, a, casting="same_kind")  # round to nearest even
        return {"": h}

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(parts[""]).astype(np.float32).reshape(shape)

    def error_bound(self, w: np.ndarray) -> np.ndarray | float:
        """Per-row (or, for 1-D, whole-tensor) bound on |w - dequantize(quantize(w))|."""
        a = np.abs(np.asarray(w, dtype=np.float32))
        if a.ndim <= 1:
            return float(a.max(initial=0.0)) * F16_EPS + F16_TINY
        return (a.reshape(a.shape[0], int(np.prod(a.shape[1:]))).max(axis=1, initial=0.0) * np.float32(F16_EPS)
                + np.float32(F16_TINY)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RowwiseScheme:
    """v1 per-row symmetric integer scheme (``i8``: bits=8, qmax=127; ``i4``: bits=4, qmax=7)."""

    name: str
    dtype: str
    bits: int

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    def specs(self, tensor_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        if len(shape) != 2:
            raise QuantizationError(
                f"scheme {self.name}: tensor {tensor_name!r} must be 2-D, got shape {list(shape)}"
            )
        return [
            make_spec(tensor_name, self.dtype, shape),
            make_spec(tensor_name + SCALE_SUFFIX, "f16", (shape[0],)),
        ]

    def scales(self, w: np.ndarray) -> np.ndarray:
        """The f32 per-row scales: m/qmax, or 1.0 for an all-zero row — and for a row whose m/qmax
        underflows to 0 (m < ~1e-43, all-subnormal rows; upstream would divide by zero there)."""
        mx, mn = row_minmax(w, self.name)
        m = np.maximum(mx, -mn)
        scale = m / np.float32(self.qmax)
        scale[scale == 0] = np.float32(1.0)
        return scale.astype(np.float32, copy=False)

    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        w = as_f32_2d(w, self.name)
        rows, cols = w.shape
        scale = self.scales(w)
        s16 = f16_scales(scale, self.name)
        qmax = np.float32(self.qmax)
        half = (cols + 1) // 2
        if self.bits == 8:
            main = np.empty((rows, cols), dtype=np.int8)
        else:
            main = np.empty((rows, half), dtype=np.uint8)
        # |w/scale| <= qmax*(1 + 2^-23) whenever the scale is a normal f32, so the clamp can only
        # bite for (sub)normal-range scales; skip that pass otherwise (saves ~10%).
        need_clip = bool(scale.size) and bool(scale.min() < np.float32(2.0**-100))
        # Reused chunk buffers: everything stays in cache, no page faults on big temporaries.
        step = min(rows, chunk_rows(cols, _CHUNK_ELEMENTS))
        buf = np.empty((step, cols), dtype=np.float32)
        tmp = np.empty((step, cols), dtype=np.float32)
        bits, tbits = buf.view(np.uint32), tmp.view(np.uint32)
        # int8 codes, rows padded to an even length so byte pairs can be read as uint16
        ibuf = np.zeros((step, 2 * half), dtype=np.int8)
        pairs = np.empty((step, half), dtype=np.uint16)
        for sl in row_chunks(rows, cols, _CHUNK_ELEMENTS):
            n = sl.stop - sl.start
            x, t = buf[:n], tmp[:n]
            np.divide(w[sl], scale[sl, None], out=x)  # f32 division with the f32 scale
            # round half away from zero = trunc(x + copysign(HALF_DOWN, x)); the copysign is done
            # on the bits (sign bit of x | bits of HALF_DOWN): the same value, ~5x cheaper than
            # np.copysign. The float->int cast below truncates toward zero, so the explicit trunc
            # is only needed before a clamp.
            tb = tbits[:n]
            np.bitwise_and(bits[:n], _SIGN_BIT, out=tb)
            np.bitwise_or(tb, _HALF_DOWN_BITS, out=tb)
            np.add(x, t, out=x)
            if need_clip:
                np.trunc(x, out=x)
                np.clip(x, -qmax, qmax, out=x)
            if self.bits == 8:
                np.copyto(main[sl], x, casting="unsafe")
                continue
            q = ibuf[:n]
            np.copyto(q[:, :cols], x, casting="unsafe")
            u = q.view(np.uint8)
            u[:, :cols] += np.uint8(8)  # nibble q + 8 in [1, 15] (two's complement wrap-around)
            if cols % 2:
                u[:, cols] = 8  # pad nibble (q = 0)
            # little endian: pair = lo + 256*hi  ->  low byte of (pair | pair >> 4) = lo | hi << 4
            v = u.view(np.uint16)
            pr = pairs[:n]
            np.right_shift(v, 4, out=pr)
            np.bitwise_or(pr, v, out=pr)
            np.copyto(main[sl], pr, casting="unsafe")
        return {"": main, SCALE_SUFFIX: s16}

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        rows, cols = shape
        s = np.asarray(parts[SCALE_SUFFIX]).astype(np.float32).reshape(rows, 1)
        main = np.asarray(parts[""])
        if self.bits == 8:
            q = main.reshape(rows, cols).astype(np.float32)
        else:
            q = unpack_nibbles(main.reshape(rows, (cols + 1) // 2), cols).astype(np.float32)
            q -= np.float32(8.0)
        q *= s
        return q

    def error_bound(self, w: np.ndarray) -> np.ndarray:
        """Per-row bound: f16(scale)/2 + qmax*|scale - f16(scale)| + f32 rounding slack."""
        w = as_f32_2d(w, self.name)
        scale = self.scales(w)
        s16 = f16_scales(scale, self.name).astype(np.float32)
        m = np.abs(w).max(axis=1)
        bound = (np.maximum(scale, s16) * np.float32(0.5)
                 + np.float32(self.qmax) * np.abs(scale - s16)
                 + m * np.float32(2.0**-20) + np.float32(F16_TINY))
        return bound.astype(np.float32)


def quantize_rowwise(w: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    return RowwiseScheme(f"i{bits}", f"i{bits}", bits).quantize(w)
