"""GPTQ-style error-compensating group-wise int4 (same ``q4gB`` storage as RTN, MatMulNBits layout).

For a linear layer ``y = x @ W.T`` (``W`` [N, K], groups of B along the input dimension K) and the
calibration second moments ``H = X^T X / n`` ([K, K], see ``cellm.quality.calibration``), GPTQ
(Frantar et al. 2022) quantizes the input columns in order and, after each column, spreads its
rounding error over the not-yet-quantized columns through the inverse Hessian, so the layer OUTPUT
error ``tr(dW H dW^T)`` is minimised instead of the weight error. Variant used here:

* dampening ``H += damp * mean(diag H) * I``; dead inputs (``H_kk == 0``) get ``H_kk = 1`` and their
  weights are quantized as they are (they never see a non-zero input);
* act-order OFF (columns in natural order) so the storage stays the plain block layout;
* each group's scale and zero point are chosen when the sweep reaches the group, from the
  error-updated weights, with the importance-weighted clipping search of ``cellm.quant.clip``;
* lazy batch updates in blocks of 128 columns (the standard GPTQ formulation).

All arithmetic is float64 for the Cholesky factor and float32 for the weight sweep; there is no
randomness and the reductions are fixed-order BLAS calls on fixed shapes, so the same inputs give the
same bytes on the same machine/BLAS.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellm.errors import QuantizationError
from cellm.format.constants import TensorSpec
from cellm.quant.clip import clip_search_block
from cellm.quant.common import as_f32_2d
from cellm.quant.groupwise import GroupwiseScheme, checked_weight, dequantize_groupwise, n_blocks, pack_groupwise

DEFAULT_DAMP = 0.01
# range shrink factors searched per group inside the sweep (a coarse grid: measured on Gemma-3 270M
# layers it matches the fine clip grid's output error, at a third of the cost)
GPTQ_ALPHAS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_LAZY = 128
_ROW_CHUNK = 1 << 22  # elements of W swept at once


def _inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), with dampening; float64."""
    h = np.array(h, dtype=np.float64, copy=True)
    k = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    d = float(np.mean(np.diag(h)))
    for attempt in range(6):
        hd = h + np.eye(k) * (damp * (10.0**attempt) * d)
        try:
            linv = np.linalg.inv(np.linalg.cholesky(hd))
            hinv = linv.T @ linv
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            continue
    raise QuantizationError(f"GPTQ: calibration Hessian [{k}x{k}] is not positive definite even with damping")


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, block: int, damp: float = DEFAULT_DAMP,
                  clip: bool = True, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ sweep. Returns uint8 codes [N, nb*B], f16 scales [N, nb], uint8 zero points [N, nb]
    (all 8 when ``symmetric``: the ``q4gB-sym`` grid, whose storage omits the zero points)."""
    w = checked_weight(w, block, f"q4g{block}-gptq")
    n, k = w.shape
    h = np.asarray(hessian)
    if h.shape != (k, k):
        raise QuantizationError(f"GPTQ: Hessian shape {list(h.shape)} does not match K={k} of weight {list(w.shape)}")
    if not np.isfinite(h).all():
        raise QuantizationError("GPTQ: Hessian holds non-finite values")
    nb = n_blocks(k, block)
    kp = nb * block
    u = np.zeros((kp, kp), dtype=np.float64)
    u[:k, :k] = _inverse_cholesky_upper(h, damp)
    for j in range(k, kp):  # padded columns: identity (their weights are 0 and stay 0)
        u[j, j] = 1.0
    u = u.astype(np.float32)
    diag_h = np.zeros(kp, dtype=np.float32)
    diag_h[:k] = np.maximum(np.diag(h).astype(np.float32), 0)

    codes = np.zeros((n, kp), dtype=np.uint8)
    scales = np.ones((n, nb), dtype=np.float32)
    zeros = np.full((n, nb), 8.0, dtype=np.float32)
    rows = max(1, _ROW_CHUNK // kp)
    for r0 in range(0, n, rows):  # rows are independent given H
        r1 = min(n, r0 + rows)
        wk = np.zeros((r1 - r0, kp), dtype=np.float32)
        wk[:, :k] = w[r0:r1]
        _sweep(wk, u, diag_h, block, clip, codes[r0:r1], scales[r0:r1], zeros[r0:r1], symmetric)
    return codes, scales.astype(np.float16), zeros.astype(np.uint8)


def _sweep(wk, u, diag_h, block, clip, codes, scales, zeros, symmetric=False) -> None:
    """One row slice: wk [R, kp] float32 (modified), outputs written into the given views."""
    kp = wk.shape[1]
    alphas = GPTQ_ALPHAS if clip else (1.0,)
    wt_all = wk.T.copy()  # [kp, R]: columns contiguous
    for c0 in range(0, kp, _LAZY):
        c1 = min(kp, c0 + _LAZY)
        w1 = wt_all[c0:c1]
        err1 = np.zeros_like(w1)
        u1 = u[c0:c1, c0:c1]
        for i in range(c1 - c0):
            col = c0 + i
            g = col // block
            if col % block == 0:
                # group parameters from the current (error-updated) weights of this group
                seg = w1[i:i + block].T  # _LAZY is a multiple of every block size
                wt = diag_h[col:col + block][None, None, :]
                sg, zg = clip_search_block(np.ascontiguousarray(seg)[:, None, :], wt, alphas, refit=clip,
                                           symmetric=symmetric)
                scales[:, g] = sg[:, 0]
                zeros[:, g] = zg[:, 0]
                s = scales[:, g].copy()
                z = zeros[:, g].copy()
            x = w1[i]
            q = x / s
            q += z
            np.rint(q, out=q)
            np.clip(q, 0.0, 15.0, out=q)
            codes[:, col] = q
            q -= z
            q *= s
            e = err1[i]
            np.subtract(x, q, out=e)
            e /= u1[i, i]
            if i + 1 < c1 - c0:
                w1[i + 1:] -= u1[i, i + 1:, None] * e[None, :]
        if c1 < kp:
            wt_all[c1:] -= u[c0:c1, c1:].T @ err1


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, block: int, damp: float = DEFAULT_DAMP,
                  symmetric: bool = False) -> dict[str, np.ndarray]:
    codes, scales, zeros = gptq_quantize(w, hessian, block, damp, symmetric=symmetric)
    return pack_groupwise(codes, scales, None if symmetric else zeros, block)


@dataclasses.dataclass(frozen=True)
class GptqScheme:
    """``q4gB-gptq``: dtype ``q4gB`` (asymmetric). ``quantize(w, hessian=H)`` needs the calibration
    second moments of the tensor's input ([K, K]); without them it raises QuantizationError (the
    converter must pass ``hessian=`` per tensor, see ``cellm.quality.calibration``)."""

    name: str
    dtype: str
    block: int
    needs_calibration: bool = True
    symmetric: bool = False  # ``q4gB-gptq-sym``: no zero points (onnxruntime's fast symmetric kernels)

    def specs(self, tensor_name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        return GroupwiseScheme(self.dtype, self.dtype, self.block, symmetric=self.symmetric).specs(tensor_name, shape)

    def quantize(self, w: np.ndarray, hessian: np.ndarray | None = None, **_: object) -> dict[str, np.ndarray]:
        if hessian is None:
            raise QuantizationError(
                f"scheme {self.name} needs calibration statistics: call quantize(w, hessian=H) with "
                f"H = X^T X / n of the tensor's input (cellm.quality.calibration), or use "
                f"cellm.quality.build which passes them"
            )
        return quantize_gptq(w, hessian, self.block, symmetric=self.symmetric)

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_groupwise(parts, shape, self.block)

    def error_bound(self, w: np.ndarray) -> np.ndarray:
        """Per-row bound (loose): GPTQ moves weights by compensation, so bound by the row's range
        times 2 (compensated values stay within about the group range)."""
        w = as_f32_2d(w, self.name)
        rng = w.max(axis=1) - w.min(axis=1)
        return (np.abs(rng) * np.float32(2.0) + np.abs(w).max(axis=1) + np.float32(2.0**-20)).astype(np.float32)
