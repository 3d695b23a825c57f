"""Bit packing along the last axis.

* 4-bit: element 2k in the LOW nibble, 2k+1 in the HIGH nibble. This is the packing of cellm v1
  ``i4`` rows, of the group-wise ``q4g*`` blocks (onnxruntime MatMulNBits ``B``) and of the ``u4``
  zero points (MatMulNBits ``zero_points``).
* 6-bit (``q6g*`` blocks): a little-endian bit stream, code j in bits ``[6j, 6j+6)``; every 4 codes
  fill 3 bytes: ``b0 = c0 | c1<<6``, ``b1 = c1>>2 | c2<<4``, ``b2 = c2>>4 | c3<<2`` (mod 256).
"""

from __future__ import annotations

import numpy as np

from cellm.errors import QuantizationError


def pack_nibbles(u: np.ndarray, pad: int = 0) -> np.ndarray:
    """uint8 values in [0, 15] of shape [..., n] -> uint8 [..., ceil(n/2)].

    An odd ``n`` is padded with the nibble ``pad`` in the last high nibble. Values are not range
    checked here (callers produce them with ``clip``); bits above the low nibble are masked off.
    """
    u = np.asarray(u)
    if u.dtype != np.uint8:
        raise QuantizationError(f"pack_nibbles needs uint8 input, got {u.dtype}")
    if not 0 <= pad <= 15:
        raise QuantizationError(f"pad nibble {pad} must be in [0, 15]")
    if u.ndim == 0:
        raise QuantizationError("pack_nibbles needs at least one dimension")
    n = u.shape[-1]
    lo = u[..., 0::2]
    hi = u[..., 1::2]
    out = np.empty(u.shape[:-1] + ((n + 1) // 2,), dtype=np.uint8)
    if n % 2:
        out[..., :-1] = hi
        out[..., -1] = pad
    else:
        out[...] = hi
    np.left_shift(out, 4, out=out)
    np.bitwise_or(out, lo & 0x0F, out=out)
    return out


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [..., ceil(n/2)] -> uint8 [..., n] (low nibble first)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise QuantizationError(f"unpack_nibbles needs uint8 input, got {packed.dtype}")
    if packed.ndim == 0 or packed.shape[-1] != (n + 1) // 2:
        raise QuantizationError(
            f"unpack_nibbles: last dimension {packed.shape[-1:]} does not hold n={n} nibbles "
            f"(needs {(n + 1) // 2} bytes)"
        )
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    np.right_shift(packed, 4, out=out[..., 1::2])
    return out[..., :n]


def pack_sextets(u: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 63] of shape [..., n] (n a multiple of 4) -> uint8 [..., 3n/4]."""
    u = np.asarray(u)
    if u.dtype != np.uint8:
        raise QuantizationError(f"pack_sextets needs uint8 input, got {u.dtype}")
    if u.ndim == 0 or u.shape[-1] % 4:
        raise QuantizationError(f"pack_sextets needs a last dimension that is a multiple of 4, got shape {list(u.shape)}")
    c = u.reshape(u.shape[:-1] + (u.shape[-1] // 4, 4)) & np.uint8(0x3F)
    out = np.empty(c.shape[:-1] + (3,), dtype=np.uint8)
    c0, c1, c2, c3 = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    np.bitwise_or(c0, c1 << 6, out=out[..., 0])
    np.bitwise_or(c1 >> 2, c2 << 4, out=out[..., 1])
    np.bitwise_or(c2 >> 4, c3 << 2, out=out[..., 2])
    return out.reshape(u.shape[:-1] + (u.shape[-1] // 4 * 3,))


def unpack_sextets(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [..., 3n/4] -> uint8 [..., n] codes in [0, 63] (n a multiple of 4)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise QuantizationError(f"unpack_sextets needs uint8 input, got {packed.dtype}")
    if n % 4 or packed.ndim == 0 or packed.shape[-1] != n // 4 * 3:
        raise QuantizationError(
            f"unpack_sextets: last dimension {packed.shape[-1:]} does not hold n={n} 6-bit codes "
            f"(needs n % 4 == 0 and {n // 4 * 3} bytes)"
        )
    b = packed.reshape(packed.shape[:-1] + (n // 4, 3))
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    out = np.empty(b.shape[:-1] + (4,), dtype=np.uint8)
    np.bitwise_and(b0, 0x3F, out=out[..., 0])
    np.bitwise_or(b0 >> 6, (b1 & 0x0F) << 2, out=out[..., 1])
    np.bitwise_or(b1 >> 4, (b2 & 0x03) << 4, out=out[..., 2])
    np.right_shift(b2, 2, out=out[..., 3])
    return out.reshape(packed.shape[:-1] + (n,))
