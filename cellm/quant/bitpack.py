"""4-bit packing along the last axis: element 2k in the LOW nibble, 2k+1 in the HIGH nibble.

This is the packing of cellm v1 ``i4`` rows, of the group-wise ``q4g*`` blocks (onnxruntime
MatMulNBits ``B``) and of the ``u4`` zero points (MatMulNBits ``zero_points``).
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
