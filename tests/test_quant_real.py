"""The schemes on real Gemma-3 270M weights: v1 bit-exactness against a differently structured
reference, error bounds, and the group-wise layout through onnxruntime's MatMulNBits."""

from __future__ import annotations

import numpy as np
import pytest

from cellm.quant.schemes import get_scheme

pytestmark = pytest.mark.real

NAMES = ["model.layers.0.mlp.down_proj.weight", "model.layers.5.self_attn.q_proj.weight",
         "model.layers.17.mlp.gate_proj.weight"]


@pytest.fixture(scope="module")
def weights(real_ckpt):
    from cellm.sources import open_source

    src = open_source(str(real_ckpt))
    out = {n: src.load(n) for n in NAMES}
    out["model.embed_tokens.weight[:4096]"] = src.load("model.embed_tokens.weight", rows=slice(0, 4096))
    return out


def reference_v1(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised differently: float64 floor(|x| + 0.5) * sign of the float32 quotient."""
    m = np.abs(w).max(axis=1)
    scale = (m / np.float32(qmax)).astype(np.float32)
    scale[scale == 0] = 1.0
    x = (w / scale[:, None]).astype(np.float32).astype(np.float64)
    q = np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), -qmax, qmax).astype(np.int64)
    return q, scale.astype(np.float16)


@pytest.mark.parametrize("scheme, qmax", [("i8", 127), ("i4", 7)])
def test_v1_bit_exact_on_real_weights(weights, scheme, qmax):
    sc = get_scheme(scheme)
    for name, w in weights.items():
        parts = sc.quantize(w)
        q, s16 = reference_v1(w, qmax)
        np.testing.assert_array_equal(parts[".qscale"].view(np.uint16), s16.view(np.uint16), err_msg=name)
        if scheme == "i8":
            np.testing.assert_array_equal(parts[""].astype(np.int64), q, err_msg=name)
        else:
            nib = (q + 8).astype(np.uint8)
            np.testing.assert_array_equal(parts[""], nib[:, 0::2] | (nib[:, 1::2] << 4), err_msg=name)
        deq = sc.dequantize(parts, w.shape)
        assert (np.abs(deq - w).max(axis=1) <= sc.error_bound(w)).all(), name


@pytest.mark.parametrize("scheme", ["q4g32", "q4g64-sym", "q4g128"])
def test_groupwise_on_real_weights_through_onnxruntime(weights, scheme):
    from test_quant_groupwise import matmulnbits

    sc = get_scheme(scheme)
    w = weights["model.layers.0.mlp.down_proj.weight"]
    n, k = w.shape
    parts = sc.quantize(w)
    deq = sc.dequantize(parts, w.shape)
    assert (np.abs(deq - w).max(axis=1) <= sc.error_bound(w)).all()
    a = np.random.default_rng(0).standard_normal((4, k)).astype(np.float32)
    ref = a.astype(np.float64) @ deq.astype(np.float64).T
    y = matmulnbits(a, parts, n, k, sc.block, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    # group-wise RTN is much closer to the weights than per-row i4 (the point of the extension)
    e_g = np.abs(deq - w).mean()
    e_r = np.abs(get_scheme("i4").dequantize(get_scheme("i4").quantize(w), w.shape) - w).mean()
    assert e_g < 0.7 * e_r
