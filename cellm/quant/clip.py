"""Group-wise int4 with a per-group range (clipping) search — same storage as ``q4gB`` (MatMulNBits).

Round-to-nearest (``cellm.quant.groupwise``) maps each block's [min, max] (widened to contain 0) onto
the 16 codes. Outliers then waste most of the grid. Here every block tries a grid of shrunk ranges
``[a*lo, a*hi]`` (``a`` in ``ALPHAS``), keeps the one with the smallest (optionally importance
weighted) squared reconstruction error, and finally re-fits the f16 scale by weighted least squares
with the chosen codes and zero point fixed (one refinement step, accepted only where it lowers the
error). The result is ordinary asymmetric ``q4gB`` storage: ``W = (q - zp) * f16(scale)``.

``importance`` (optional, shape [K]) weights the error of input column k, e.g. the diagonal of the
calibration Hessian ``X^T X`` (the mean squared input activation): errors on inputs that carry large
activations cost more. Without it the error is plain MSE, i.e. a data-free method.

Everything is deterministic element-wise numpy (no reductions whose order depends on threading
change the chosen codes beyond float32 ties, and ties are broken towards the larger range).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellm.errors import QuantizationError
from cellm.format.constants import TensorSpec
from cellm.quant.common import as_f32_2d, row_chunks
from cellm.quant.groupwise import (
    GroupwiseScheme,
    blocked,
    checked_weight,
    dequantize_groupwise,
    n_blocks,
    pack_groupwise,
)

# shrink factors tried per block (1.0 = plain RTN range); descending so ties keep the wider range
ALPHAS = tuple(np.round(np.arange(1.0, 0.599, -0.05), 4).tolist())
_CHUNK = 1 << 18


def _codes(x: np.ndarray, s: np.ndarray, zp: np.ndarray) -> np.ndarray:
    q = x / s[..., None] + zp[..., None]
    np.rint(q, out=q)
    np.clip(q, 0.0, 15.0, out=q)
    return q


def _scale_zero(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f16-representable scale (as f32) and integer zero point for the range [lo, hi] (lo<=0<=hi)."""
    s = ((hi - lo) / np.float32(15.0)).astype(np.float16).astype(np.float32)
    s[s == 0] = np.float32(1.0)
    zp = np.clip(np.rint(-lo / s), 0.0, 15.0)
    return s, zp


def _scale_sym(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric grid: ``a`` (the signed largest-magnitude value, shrunk) maps to code -8 (zp 8)."""
    s = (a / np.float32(-8.0)).astype(np.float16).astype(np.float32)
    s[s == 0] = np.float32(1.0)
    return s, np.full(s.shape, 8.0, dtype=np.float32)


def _block_error(xb: np.ndarray, s: np.ndarray, zp: np.ndarray, wt: np.ndarray | None) -> np.ndarray:
    """(Weighted) squared reconstruction error per block of ``xb`` [R, nb, B] with scales/zero points [R, nb]."""
    q = _codes(xb, s, zp)
    q -= zp[..., None]
    q *= s[..., None]
    q -= xb
    np.square(q, out=q)
    if wt is not None:
        q *= wt
    return q.sum(axis=2, dtype=np.float32)


def clip_search_block(xb: np.ndarray, wt: np.ndarray | None, alphas=ALPHAS,
                      refit: bool = True, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Best f16 scale (float32 values) and zero point for blocks ``xb`` [R, nb, B].

    ``wt`` (broadcastable to ``xb``) weights the squared error; None = unweighted. ``symmetric``:
    the zero point is fixed at 8 and the range is ``a*[-8, 7]/-8`` for the signed largest-magnitude
    value ``a`` (the ``q4gB-sym`` grid, onnxruntime's fast symmetric kernels), shrunk by each alpha.
    """
    mn = np.minimum(xb.min(axis=2), np.float32(0.0))
    mx = np.maximum(xb.max(axis=2), np.float32(0.0))
    amax = np.where(np.abs(mx) > np.abs(mn), mx, mn) if symmetric else None
    best_err = np.full(mn.shape, np.inf, dtype=np.float32)
    best_s = np.ones(mn.shape, dtype=np.float32)
    best_z = np.full(mn.shape, 8.0, dtype=np.float32)
    for a in alphas:
        a = np.float32(a)
        s, zp = _scale_sym(amax * a) if symmetric else _scale_zero(mn * a, mx * a)
        err = _block_error(xb, s, zp, wt)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, zp, best_z)
    if not refit:
        return best_s, best_z
    # least-squares refit of the scale with the codes and zero point fixed
    q = _codes(xb, best_s, best_z) - best_z[..., None]
    wq = q if wt is None else q * wt
    num = (wq * xb).sum(axis=2, dtype=np.float32)
    den = (wq * q).sum(axis=2, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_ls = np.where(den > 0, num / den, best_s)
    s_ls = s_ls.astype(np.float16).astype(np.float32)
    ok = np.isfinite(s_ls) & ((s_ls != 0) if symmetric else (s_ls > 0))
    s_ls = np.where(ok, s_ls, best_s)
    use = _block_error(xb, s_ls, best_z, wt) < best_err
    return np.where(use, s_ls, best_s), best_z


def _importance_weights(importance: np.ndarray | None, k: int, nb: int, block: int) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.asarray(importance, dtype=np.float32).reshape(-1)
    if imp.shape[0] != k or not np.isfinite(imp).all() or (imp < 0).any():
        raise QuantizationError(
            f"importance must be {k} finite non-negative values, got shape {list(imp.shape)}"
        )
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:k] = imp
    return padded.reshape(1, nb, block)


def _chunk_codes(xb: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """uint8-valued codes [R, nb*B] of blocks ``xb`` for f16 ``scales`` / uint8 ``zeros`` [R, nb]."""
    return _codes(xb, scales.astype(np.float32), zeros.astype(np.float32)).reshape(xb.shape[0], -1)


def _clip(w: np.ndarray, block: int, importance: np.ndarray | None, alphas,
          with_codes: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One pass over row chunks of ``w``: searched f16 scales, uint8 zero points [N, nb] and, with
    ``with_codes``, the uint8 codes [N, nb*B] (each chunk blocked once for both)."""
    w = checked_weight(w, block, f"q4g{block}-clip")
    n, k = w.shape
    nb = n_blocks(k, block)
    wt = _importance_weights(importance, k, nb, block)
    scales = np.empty((n, nb), dtype=np.float16)
    zeros = np.empty((n, nb), dtype=np.uint8)
    codes = np.empty((n, nb * block), dtype=np.uint8) if with_codes else None
    for sl in row_chunks(n, nb * block, _CHUNK):
        xb = blocked(w[sl], block)
        s, z = clip_search_block(xb, wt, alphas)
        scales[sl] = s.astype(np.float16)
        zeros[sl] = z.astype(np.uint8)
        if codes is not None:
            codes[sl] = _chunk_codes(xb, scales[sl], zeros[sl])
    return scales, zeros, codes


def clip_scales(w: np.ndarray, block: int, importance: np.ndarray | None = None,
                alphas=ALPHAS) -> tuple[np.ndarray, np.ndarray]:
    """Searched f16 scales [N, nb] and uint8 zero points [N, nb] for asymmetric ``q4g<block>``."""
    scales, zeros, _ = _clip(w, block, importance, alphas, with_codes=False)
    return scales, zeros


def codes_for(w: np.ndarray, block: int, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """uint8 codes [N, nb*B] for given f16 scales and zero points (``rint(w/s + zp)`` clipped)."""
    n, k = w.shape
    out = np.empty((n, n_blocks(k, block) * block), dtype=np.uint8)
    for sl in row_chunks(n, out.shape[1], _CHUNK):
        out[sl] = _chunk_codes(blocked(w[sl], block), scales[sl], zeros[sl])
    return out


def quantize_clip(w: np.ndarray, block: int, importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Storage parts (``""``, ``.qscale``, ``.qzero``) of ``q4g<block>`` with searched ranges."""
    scales, zeros, codes = _clip(w, block, importance, ALPHAS, with_codes=True)
    return pack_groupwise(codes, scales, zeros, block)


@dataclasses.dataclass(frozen=True)
class ClipScheme:
    """``q4gB-clip``: dtype ``q4gB`` (asymmetric), per-group clipping search.

    ``quantize(w, hessian=None, importance=None)``: with a calibration ``hessian`` ([K, K], X^T X)
    or ``importance`` ([K]) the search weights errors by the input second moments; without, MSE.
    """

    name: str
    dtype: str
    block: int
    needs_calibration: bool = False

    def _rtn(self) -> GroupwiseScheme:
        return GroupwiseScheme(self.dtype, self.dtype, self.block, symmetric=False)

    def specs(self, tensor_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        return self._rtn().specs(tensor_name, shape)

    def quantize(self, w: np.ndarray, hessian: np.ndarray | None = None,
                 importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if importance is None and hessian is not None:
            importance = np.diag(np.asarray(hessian, dtype=np.float32)).copy()
        return quantize_clip(w, self.block, importance)

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_groupwise(parts, shape, self.block)

    def error_bound(self, w: np.ndarray) -> np.ndarray:
        """Per-row bound (loose): a value never moves by more than its block's range (which contains 0
        and the dequantized grid's clipped end points)."""
        w = as_f32_2d(w, self.name)
        b = blocked(w, self.block)
        rng = np.maximum(b.max(axis=2), 0) - np.minimum(b.min(axis=2), 0)
        return (rng.max(axis=1) * np.float32(1.01) + np.float32(2.0**-20)).astype(np.float32)
