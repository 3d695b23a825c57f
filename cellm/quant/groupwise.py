"""Group-wise int4 (extension dtypes ``q4g32``/``q4g64``/``q4g128``), stored exactly as onnxruntime's
``com.microsoft.MatMulNBits`` consumes it (bits=4, block_size=B, weight ``W`` of shape [N, K]):

* main (dtype ``q4gB``): uint8 ``[N, ceil(K/B), B/2]``; block j of row n holds
  ``W[n, j*B:(j+1)*B]``, element 2i in the LOW nibble of byte i; the last block is zero padded.
* ``<name>.qscale`` (dtype f16): ``[N, ceil(K/B)]``.
* ``<name>.qzero`` (dtype ``u4``, asymmetric only): logical ``[N, ceil(K/B)]``, stored packed as
  uint8 ``[N, ceil(ceil(K/B)/2)]`` low nibble first, an odd count padded with the nibble 0.
  Absent means symmetric with the implied zero point 8.
* dequant: ``W[n, k] = (q[n, k] - zp[n, k//B]) * f16(scale[n, k//B])``.

RTN quantizers (``q4gB`` asymmetric and ``q4gB-sym``) follow onnxruntime's block quantizer
(``quantize_matmul_4bits`` / MLAS):
* asymmetric: ``lo = min(min(block), 0)``, ``hi = max(max(block), 0)`` (the range always contains 0,
  so 0 is represented exactly), ``scale = (hi - lo)/15`` rounded UP to f16 (so the bound below holds),
  ``zp = clip(rint(-lo/s16), 0, 15)``, ``q = clip(rint(w/s16 + zp), 0, 15)``.
* symmetric: ``a = the block value of largest magnitude (signed)``, ``scale = a / -8`` (so ``a`` maps
  to -8 exactly; the scale may be negative), ``s16 = f16(scale)``, ``q = clip(rint(w/s16), -8, 7) + 8``.
* an all-zero block (or a scale that underflows f16) stores scale 1.0 (and zp 8 in the asymmetric
  case for an exactly all-zero block) — never a division by zero.
``rint`` is round half to even (like onnxruntime's Python quantizer; MLAS may differ on exact ties).
Error bound per block: asymmetric ``s16/2``; symmetric ``|s16|`` for values clipped to +7 (the side
opposite the largest magnitude), otherwise ``|s16|/2`` — plus float32 rounding slack.

Rows are independent: callers may quantize row slices separately and concatenate the parts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellm.errors import QuantizationError
from cellm.format.constants import (
    DTYPES,
    GROUP_SIZES,
    SCALE_SUFFIX,
    ZERO_DTYPE,
    ZERO_SUFFIX,
    TensorSpec,
    make_spec,
)
from cellm.quant.bitpack import pack_nibbles, unpack_nibbles
from cellm.quant.common import as_f32_2d, chunk_rows, f16_scales, raise_nonfinite, row_chunks


GROUP_CHUNK = 1 << 17  # elements per row chunk (fewer, larger chunks amortise per-block calls)


def n_blocks(k: int, block: int) -> int:
    return (k + block - 1) // block


def check_block(block: int) -> None:
    if block not in GROUP_SIZES:
        raise QuantizationError(f"block size {block} unsupported; supported: {list(GROUP_SIZES)}")


def checked_weight(w: np.ndarray, block: int, scheme: str) -> np.ndarray:
    """A supported block size and a finite 2-D weight as float32 (QuantizationError naming ``scheme``)."""
    check_block(block)
    w = as_f32_2d(w, scheme)
    if not np.isfinite(w).all():
        raise_nonfinite(w, scheme)
    return w


def blocked(w: np.ndarray, block: int) -> np.ndarray:
    """[N, K] float32 -> [N, nb, B] (zero padded copy only when K % B != 0)."""
    n, k = w.shape
    nb = n_blocks(k, block)
    if k % block:
        p = np.zeros((n, nb * block), dtype=np.float32)
        p[:, :k] = w
        w = p
    return w.reshape(n, nb, block)


def _rtn_from_minmax(mx: np.ndarray, mn: np.ndarray, symmetric: bool, scheme: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block f16 scales and uint8 zero points (None when symmetric) from block max/min."""
    if symmetric:
        a = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        s16 = f16_scales(a / np.float32(-8.0), scheme)
        s16[s16 == 0] = np.float16(1.0)
        return s16, None
    lo = np.minimum(mn, np.float32(0.0))
    hi = np.maximum(mx, np.float32(0.0))
    s16 = f16_scales((hi - lo) / np.float32(15.0), scheme, round_up=True)
    zero_block = s16 == 0
    s16[zero_block] = np.float16(1.0)
    zp = np.rint(-lo / s16.astype(np.float32))
    np.clip(zp, 0, 15, out=zp)
    zp = zp.astype(np.uint8)
    zp[zero_block] = 8
    return s16, zp


def rtn_scales(w: np.ndarray, block: int, symmetric: bool, scheme: str = "q4g") -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest f16 scales [N, nb] and uint8 zero points [N, nb] (None when symmetric)."""
    b = blocked(as_f32_2d(w, scheme), block)
    mx = b.max(axis=2)
    mn = b.min(axis=2)
    if not (np.isfinite(mx).all() and np.isfinite(mn).all()):
        raise_nonfinite(w, scheme)
    return _rtn_from_minmax(mx, mn, symmetric, scheme)


def pack_groupwise(codes: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, block: int) -> dict[str, np.ndarray]:
    """uint8 codes [N, nb*B] (or [N, K]) + scales [N, nb] + zero points [N, nb]|None -> storage parts.

    Codes beyond K (when given [N, K] with K % B != 0) are padded with the block's zero point (8 when
    symmetric), so padding dequantizes to exactly 0.
    """
    check_block(block)
    codes = np.asarray(codes, dtype=np.uint8)
    n = codes.shape[0]
    nb = np.asarray(scales).shape[1]
    if codes.shape[1] != nb * block:
        if n_blocks(codes.shape[1], block) != nb:
            raise QuantizationError(
                f"codes of shape {list(codes.shape)} do not match {nb} blocks of {block}"
            )
        p = np.full((n, nb * block), 8, dtype=np.uint8)
        if zero is not None:
            p[:, codes.shape[1]:] = np.asarray(zero, dtype=np.uint8)[:, -1:]
        p[:, : codes.shape[1]] = codes
        codes = p
    parts = {
        "": pack_nibbles(codes.reshape(n, nb, block)),
        SCALE_SUFFIX: np.ascontiguousarray(np.asarray(scales).astype("<f2")),
    }
    if zero is not None:
        parts[ZERO_SUFFIX] = pack_nibbles(np.asarray(zero, dtype=np.uint8), pad=0)
    return parts


def quantize_groupwise(w: np.ndarray, block: int, symmetric: bool, scale: np.ndarray | None = None,
                       zero: np.ndarray | None = None, scheme: str | None = None) -> dict[str, np.ndarray]:
    """Quantize [N, K] to the MatMulNBits parts.

    RTN scales/zero points unless ``scale`` ([N, nb], f16 or f32; rounded to f16 as stored) and, for
    the asymmetric form, ``zero`` ([N, nb] integers in [0, 15]) are given — clipping searches and
    other scale choosers reuse the exact code assignment ``q = clip(rint(w/s16 + zp), 0, 15)``.
    Works on row chunks with reused cache-sized buffers (one read of ``w``).
    """
    check_block(block)
    name = scheme or f"q4g{block}{'-sym' if symmetric else ''}"
    w = as_f32_2d(w, name)
    n, k = w.shape
    if k == 0:
        raise QuantizationError(f"scheme {name}: rows of length 0 (shape {list(w.shape)})")
    nb = n_blocks(k, block)
    kp = nb * block
    given = scale is not None
    if given:
        s_all = np.asarray(scale).astype(np.float16)
        if s_all.shape != (n, nb):
            raise QuantizationError(f"scheme {name}: scales have shape {list(s_all.shape)}, expected {[n, nb]}")
        if not np.isfinite(s_all).all() or (s_all == 0).any():
            raise QuantizationError(f"scheme {name}: scales must be finite and non-zero after f16 rounding")
        if symmetric:
            z_all = None
        elif zero is None:
            raise QuantizationError(f"scheme {name}: asymmetric quantization with given scales needs zero points")
        else:
            z_all = np.asarray(zero)
            if z_all.shape != (n, nb) or (z_all < 0).any() or (z_all > 15).any():
                raise QuantizationError(f"scheme {name}: zero points must be [N, nb]={[n, nb]} in [0, 15]")
            z_all = z_all.astype(np.uint8)
    else:
        s_all = np.empty((n, nb), dtype=np.float16)
        z_all = None if symmetric else np.empty((n, nb), dtype=np.uint8)
    main = np.empty((n, nb, block // 2), dtype=np.uint8)
    step = min(n, chunk_rows(kp, GROUP_CHUNK))
    buf = np.zeros((step, kp), dtype=np.float32)
    ubuf = np.empty((step, kp), dtype=np.uint8)
    pairs = np.empty((step, kp // 2), dtype=np.uint16)
    tbuf = np.empty((block, step * nb), dtype=np.float32)
    for sl in row_chunks(n, kp, GROUP_CHUNK):
        m = sl.stop - sl.start
        x = buf[:m]
        x[:, :k] = w[sl]
        if kp != k:
            x[:, k:] = 0.0
        xb = x.reshape(m, nb, block)
        # block max/min: reducing a transposed copy along axis 0 is ~2x faster than axis=2
        xt = tbuf[:, : m * nb]
        np.copyto(xt, x.reshape(m * nb, block).T)
        mx = xt.max(axis=0).reshape(m, nb)
        mn = xt.min(axis=0).reshape(m, nb)
        if not (np.isfinite(mx).all() and np.isfinite(mn).all()):
            raise_nonfinite(w, name)
        if given:
            s16 = s_all[sl]
            zp = None if z_all is None else z_all[sl]
        else:
            s16, zp = _rtn_from_minmax(mx, mn, symmetric, name)
            s_all[sl] = s16
            if zp is not None:
                z_all[sl] = zp
        np.divide(xb, s16.astype(np.float32)[:, :, None], out=xb)
        if zp is None:
            xb += np.float32(8.0)
        else:
            xb += zp.astype(np.float32)[:, :, None]
        np.rint(xb, out=xb)
        np.clip(xb, np.float32(0.0), np.float32(15.0), out=xb)
        # codes -> bytes; little endian: pair = lo + 256*hi -> low byte of (pair | pair >> 4)
        u = ubuf[:m]
        np.copyto(u, x, casting="unsafe")
        v = u.view(np.uint16)
        pr = pairs[:m]
        np.right_shift(v, 4, out=pr)
        np.bitwise_or(pr, v, out=pr)
        np.copyto(main[sl].reshape(m, -1), pr, casting="unsafe")
    parts = {"": main, SCALE_SUFFIX: s_all}
    if z_all is not None:
        parts[ZERO_SUFFIX] = pack_nibbles(z_all, pad=0)
    return parts


def dequantize_groupwise(parts: dict[str, np.ndarray], shape: tuple[int, ...], block: int) -> np.ndarray:
    """Storage parts -> float32 [N, K]: ``(q - zp) * f16(scale)`` (zp 8 without ``.qzero``)."""
    n, k = shape
    nb = n_blocks(k, block)
    q = unpack_nibbles(np.asarray(parts[""]).reshape(n, nb, block // 2), block).astype(np.float32)
    s = np.asarray(parts[SCALE_SUFFIX]).reshape(n, nb).astype(np.float32)
    z = parts.get(ZERO_SUFFIX)
    if z is None:
        q -= np.float32(8.0)
    else:
        zp = unpack_nibbles(np.asarray(z).reshape(n, (nb + 1) // 2), nb).astype(np.float32)
        q -= zp[:, :, None]
    q *= s[:, :, None]
    return np.ascontiguousarray(q.reshape(n, nb * block)[:, :k])


def groupwise_specs(scheme: str, dtype: str, block: int, symmetric: bool, tensor_name: str,
                    shape: tuple[int, ...]) -> list[TensorSpec]:
    """Main tensor + ``.qscale`` (f16 [N, nb]) + ``.qzero`` ([N, nb], ``u4`` for q4gB / ``u8`` for
    q6gB; asymmetric only) of any group-wise dtype."""
    if len(shape) != 2:
        raise QuantizationError(f"scheme {scheme}: tensor {tensor_name!r} must be 2-D, got shape {list(shape)}")
    nb = n_blocks(shape[1], block)
    out = [make_spec(tensor_name, dtype, shape), make_spec(tensor_name + SCALE_SUFFIX, "f16", (shape[0], nb))]
    if not symmetric:
        out.append(make_spec(tensor_name + ZERO_SUFFIX, ZERO_DTYPE[DTYPES[dtype].bits], (shape[0], nb)))
    return out


@dataclasses.dataclass(frozen=True)
class GroupwiseScheme:
    name: str
    dtype: str
    block: int
    symmetric: bool

    def specs(self, tensor_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        return groupwise_specs(self.name, self.dtype, self.block, self.symmetric, tensor_name, shape)

    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return quantize_groupwise(w, self.block, self.symmetric, scheme=self.name)

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_groupwise(parts, shape, self.block)

    def error_bound(self, w: np.ndarray) -> np.ndarray:
        """Per-row bound on |w - dequantize(quantize(w))| (max over the row's blocks)."""
        w = as_f32_2d(w, self.name)
        s16, _ = rtn_scales(w, self.block, self.symmetric, self.name)
        s = np.abs(s16.astype(np.float32))
        per_block = s * np.float32(1.0 if self.symmetric else 0.5) * np.float32(1.0 + 2.0**-8)
        amax = np.abs(blocked(w, self.block)).max(axis=2)
        per_block = per_block + amax * np.float32(2.0**-20) + np.float32(2.0**-22)
        return per_block.max(axis=1).astype(np.float32)
