"""Group-wise 6-bit (extension dtypes ``q6g32``/``q6g64``/``q6g128``): the step between int4 and i8.

Why: on Gemma-3 the tied embedding / LM head holds most of the parameters (63% on the 270M). Per-row
``i8`` keeps it nearly lossless but costs 1 byte per weight; int4 costs ~0.58 bytes but is the
single largest source of quality loss. 6-bit groups of 32 cost 0.84 bytes (asymmetric) and measure
like ``i8`` (see docs/QUALITY-INT4.md), which frees budget for the decoder layers.

Storage, for a logical weight ``W`` [N, K] and block size B (groups along the input dimension K):

* main (dtype ``q6gB``): uint8 ``[N, ceil(K/B), 3*B/4]``; block j of row n holds the codes of
  ``W[n, j*B:(j+1)*B]`` packed 4 codes per 3 bytes, little-endian bit stream (code i in bits
  ``[6i, 6i+6)``, see ``cellm.quant.bitpack.pack_sextets``); the last block is padded with the zero
  point so padding dequantizes to exactly 0.
* ``<name>.qscale`` (dtype f16): ``[N, ceil(K/B)]``.
* ``<name>.qzero`` (dtype ``u8``, asymmetric only): ``[N, ceil(K/B)]`` zero points in [0, 63], one
  byte each. Absent means symmetric with the implied zero point 32.
* dequant: ``W[n, k] = (q[n, k] - zp[n, k//B]) * f16(scale[n, k//B])``.

onnxruntime has no 6-bit MatMulNBits; the ONNX export widens the codes to ``bits=8`` with the same
block size, scales and zero points (symmetric: codes + 96 with the default zero point 128), which
dequantizes to bit-identical values (``cellm.onnx_export.weights``).

RTN quantizers, the 6-bit analogues of ``cellm.quant.groupwise``:
* asymmetric: ``lo = min(min(block), 0)``, ``hi = max(max(block), 0)``, ``scale = (hi - lo)/63``
  rounded UP to f16, ``zp = clip(rint(-lo/s16), 0, 63)``, ``q = clip(rint(w/s16 + zp), 0, 63)``.
* symmetric: ``a`` = the block value of largest magnitude (signed), ``scale = a / -32`` (``a`` maps
  to -32 exactly), ``q = clip(rint(w/s16), -32, 31) + 32``.
* an all-zero block stores scale 1.0 (zp 32 when asymmetric).
Error bound per block: asymmetric ``s16/2``; symmetric ``|s16|·(1 + 2⁻⁶)`` (the side opposite the
largest magnitude clips at +31, and f16 rounding of the scale may shrink it by 2⁻¹¹ relative), plus
float32 rounding slack. Rows are independent (row slices quantize to
identical bytes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellm.errors import QuantizationError
from cellm.format.constants import SCALE_SUFFIX, ZERO_SUFFIX
from cellm.quant.bitpack import pack_sextets, unpack_sextets
from cellm.quant.common import as_f32_2d, f16_scales, raise_nonfinite, row_chunks
from cellm.quant.groupwise import GroupwiseScheme, check_block, n_blocks

QMAX = 63
SYM_ZERO = 32
ROW_CHUNK = 1 << 18  # elements per row chunk (bounded temporaries on the 168M-element embedding)


def _params(b: np.ndarray, symmetric: bool, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Blocks [m, nb, B] float32 -> (f16 scales [m, nb], float32 zero points [m, nb])."""
    mx = b.max(axis=2)
    mn = b.min(axis=2)
    if not (np.isfinite(mx).all() and np.isfinite(mn).all()):
        raise_nonfinite(b.reshape(b.shape[0], -1), scheme)
    if symmetric:
        a = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        s16 = f16_scales(a / np.float32(-SYM_ZERO), scheme)
        s16[s16 == 0] = np.float16(1.0)
        return s16, np.full(s16.shape, SYM_ZERO, dtype=np.float32)
    lo = np.minimum(mn, np.float32(0.0))
    hi = np.maximum(mx, np.float32(0.0))
    s16 = f16_scales((hi - lo) / np.float32(QMAX), scheme, round_up=True)
    zero_block = s16 == 0
    s16[zero_block] = np.float16(1.0)
    zp = np.clip(np.rint(-lo / s16.astype(np.float32)), 0, QMAX).astype(np.float32)
    zp[zero_block] = SYM_ZERO
    return s16, zp


def quantize_q6(w: np.ndarray, block: int, symmetric: bool, scheme: str | None = None) -> dict[str, np.ndarray]:
    """Quantize [N, K] (RTN) to the ``q6gB`` storage parts ``{"", ".qscale"[, ".qzero"]}``."""
    check_block(block)
    name = scheme or f"q6g{block}{'-sym' if symmetric else ''}"
    w = as_f32_2d(w, name)
    n, k = w.shape
    if k == 0:
        raise QuantizationError(f"scheme {name}: rows of length 0 (shape {list(w.shape)})")
    nb = n_blocks(k, block)
    kp = nb * block
    main = np.empty((n, nb, block * 3 // 4), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float16)
    zeros = np.empty((n, nb), dtype=np.uint8)
    for sl in row_chunks(n, kp, ROW_CHUNK):
        m = sl.stop - sl.start
        x = np.zeros((m, kp), dtype=np.float32)
        x[:, :k] = w[sl]
        xb = x.reshape(m, nb, block)
        s16, zp = _params(xb, symmetric, name)
        scales[sl] = s16
        zeros[sl] = zp.astype(np.uint8)
        xb /= s16.astype(np.float32)[:, :, None]
        xb += zp[:, :, None]
        np.rint(xb, out=xb)
        np.clip(xb, 0.0, float(QMAX), out=xb)
        if kp != k:  # padding codes = the block's zero point -> dequantizes to exactly 0
            x[:, k:] = zp[:, -1:]
        main[sl] = pack_sextets(x.astype(np.uint8).reshape(m, nb, block))
    parts = {"": main, SCALE_SUFFIX: scales}
    if not symmetric:
        parts[ZERO_SUFFIX] = zeros
    return parts


def dequantize_q6(parts: dict[str, np.ndarray], shape: tuple[int, ...], block: int) -> np.ndarray:
    """Storage parts -> float32 [N, K]: ``(q - zp) * f16(scale)`` (zp 32 without ``.qzero``)."""
    n, k = shape
    nb = n_blocks(k, block)
    q = unpack_sextets(np.asarray(parts[""]).reshape(n, nb, block * 3 // 4), block).astype(np.float32)
    s = np.asarray(parts[SCALE_SUFFIX]).reshape(n, nb).astype(np.float32)
    z = parts.get(ZERO_SUFFIX)
    if z is None:
        q -= np.float32(SYM_ZERO)
    else:
        q -= np.asarray(z).reshape(n, nb).astype(np.float32)[:, :, None]
    q *= s[:, :, None]
    return np.ascontiguousarray(q.reshape(n, nb * block)[:, :k])


@dataclasses.dataclass(frozen=True)
class Groupwise6Scheme(GroupwiseScheme):
    """``q6gB`` (asymmetric, ``.qzero`` u8) or ``q6gB-sym`` (no ``.qzero``), RTN. The fields and the
    storage specs are :class:`GroupwiseScheme`'s; the codes, their packing and the error bound differ."""

    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return quantize_q6(w, self.block, self.symmetric, scheme=self.name)

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_q6(parts, shape, self.block)

    def error_bound(self, w: np.ndarray) -> np.ndarray:
        """Per-row bound on |w - dequantize(quantize(w))| (max over the row's blocks)."""
        w = as_f32_2d(w, self.name)
        n, k = w.shape
        nb = n_blocks(k, self.block)
        out = np.empty(n, dtype=np.float32)
        for sl in row_chunks(n, nb * self.block, ROW_CHUNK):
            m = sl.stop - sl.start
            x = np.zeros((m, nb * self.block), dtype=np.float32)
            x[:, :k] = w[sl]
            b = x.reshape(m, nb, self.block)
            s16, _ = _params(b, self.symmetric, self.name)
            s = np.abs(s16.astype(np.float32))
            if self.symmetric:
                # the side opposite `a` clips at +31: |a| <= 32*|s16|*(1 + 2^-11) (f16 rounding of the
                # scale), so the error there is at most |s16|*(1 + 32*2^-11) = |s16|*(1 + 2^-6)
                s = s * np.float32(1.0 + 2.0**-6 + 2.0**-10)
            else:  # scale rounded up: every value within half a step
                s = s * np.float32(0.5 * (1.0 + 2.0**-8))
            amax = np.abs(b).max(axis=2)
            per_block = s + amax * np.float32(2.0**-20) + np.float32(2.0**-22)
            out[sl] = per_block.max(axis=1)
        return out
