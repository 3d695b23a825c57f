"""Group-wise int4 (q4g32/64/128, asymmetric and symmetric): layout checked against onnxruntime's
MatMulNBits kernel (the independent reference), error bounds, edge blocks, custom scales."""

from __future__ import annotations

import numpy as np
import pytest

from cellm.errors import QuantizationError
from cellm.quant.groupwise import dequantize_groupwise, pack_groupwise, quantize_groupwise
from cellm.quant.schemes import get_scheme

import onnx  # noqa: F401  (the test extra installs onnx + onnxruntime; no silent skip)
import onnxruntime as ort


def matmulnbits(a: np.ndarray, parts: dict, n: int, k: int, block: int, accuracy_level: int) -> np.ndarray:
    """Run one com.microsoft MatMulNBits node on onnxruntime CPU with our storage as inputs."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(parts[""], "B"), numpy_helper.from_array(parts[".qscale"].astype(np.float32), "scales")]
    inputs = ["A", "B", "scales"]
    if ".qzero" in parts:
        inits.append(numpy_helper.from_array(parts[".qzero"], "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("k", [256, 200, 96])
def test_layout_matches_onnxruntime_matmulnbits(block, sym, k):
    n = 24
    rng = np.random.default_rng(block + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[1] = 0.0  # all-zero row
    w[2, : min(k, block)] = 0.25  # constant block
    sc = get_scheme(f"q4g{block}{'-sym' if sym else ''}")
    parts = sc.quantize(w)
    nb = -(-k // block)
    assert parts[""].shape == (n, nb, block // 2) and parts[""].dtype == np.uint8
    assert parts[".qscale"].shape == (n, nb) and parts[".qscale"].dtype == np.float16
    if sym:
        assert ".qzero" not in parts
    else:
        assert parts[".qzero"].shape == (n, -(-nb // 2)) and parts[".qzero"].dtype == np.uint8
    a = rng.standard_normal((5, k)).astype(np.float32)
    ref = a.astype(np.float64) @ sc.dequantize(parts, (n, k)).astype(np.float64).T
    for level in (0, 1):
        y = matmulnbits(a, parts, n, k, block, level)
        np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def unpack_reference(parts, n, k, block):
    """Independent dequantization following the MatMulNBits spec text element by element."""
    nb = -(-k // block)
    B, S = parts[""], parts[".qscale"].astype(np.float32)
    Z = parts.get(".qzero")
    out = np.zeros((n, k), np.float64)
    for r in range(n):
        for c in range(k):
            j, i = divmod(c, block)
            byte = int(B[r, j, i // 2])
            q = (byte >> 4) if i % 2 else (byte & 15)
            if Z is None:
                zp = 8
            else:
                zb = int(Z[r, j // 2])
                zp = (zb >> 4) if j % 2 else (zb & 15)
            out[r, c] = (q - zp) * float(S[r, j])
    assert nb == B.shape[1]
    return out


@pytest.mark.parametrize("scheme", ["q4g32", "q4g32-sym", "q4g64", "q4g128-sym"])
def test_round_trip_and_error_bound(scheme):
    sc = get_scheme(scheme)
    block = sc.block
    rng = np.random.default_rng(7)
    n, k = 6, 3 * block + 5  # partial last block, odd number of blocks
    w = (rng.standard_normal((n, k)) * rng.uniform(1e-4, 50, size=(n, 1))).astype(np.float32)
    w[0] = 0.0
    w[1, :block] = -3.0  # constant negative block
    w[2, :block] = 1e-12  # scale underflows f16
    w[3, :] = np.abs(w[3])  # all positive
    parts = sc.quantize(w)
    deq = sc.dequantize(parts, (n, k))
    np.testing.assert_allclose(deq, unpack_reference(parts, n, k, block), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(deq[0], 0.0)
    # independent per-block bound: RTN error <= |s16|/2, plus |s16| for the +7 clip of symmetric
    nb = -(-k // block)
    s16 = np.abs(parts[".qscale"].astype(np.float64))
    err = np.abs(deq.astype(np.float64) - w)
    for j in range(nb):
        blk = slice(j * block, min(k, (j + 1) * block))
        amax = np.abs(w[:, blk]).max(axis=1)
        if scheme.endswith("-sym"):
            lim = s16[:, j] * (1 + 2.0**-8) + 2.0**-22
        else:
            lim = s16[:, j] / 2
        assert (err[:, blk].max(axis=1) <= lim + amax * 1e-6 + 1e-30).all(), j
    assert (err.max(axis=1) <= sc.error_bound(w)).all()
    # asymmetric: 0.0 is exactly representable, so an exact zero stays zero
    if not scheme.endswith("-sym"):
        w2 = w.copy()
        w2[4, 10] = 0.0
        np.testing.assert_array_equal(sc.dequantize(sc.quantize(w2), (n, k))[4, 10], 0.0)


def test_asymmetric_rtn_matches_formula():
    """One block, checked against the documented formulas computed here in float64."""
    w = np.linspace(-1.0, 3.0, 32, dtype=np.float32)[None, :]
    parts = get_scheme("q4g32").quantize(w)
    s = (3.0 - (-1.0)) / 15
    s16 = float(np.float16(s))
    if s16 < s:
        s16 = float(np.nextafter(np.float16(s), np.float16(np.inf)))
    assert float(parts[".qscale"][0, 0]) == s16
    zp = int(np.clip(np.rint(1.0 / s16), 0, 15))
    assert int(parts[".qzero"][0, 0]) & 15 == zp
    q = np.clip(np.rint(w[0].astype(np.float64) / s16 + zp), 0, 15).astype(np.uint8)
    np.testing.assert_array_equal(parts[""][0, 0], q[0::2] | (q[1::2] << 4))


def test_symmetric_maps_largest_magnitude_to_minus_8():
    w = np.zeros((1, 32), np.float32)
    w[0, 3] = 2.0
    w[0, 4] = -1.0
    parts = get_scheme("q4g32-sym").quantize(w)
    assert float(parts[".qscale"][0, 0]) == -0.25  # scale = 2.0 / -8
    deq = get_scheme("q4g32-sym").dequantize(parts, w.shape)
    assert deq[0, 3] == 2.0 and deq[0, 4] == -1.0


def test_custom_scales_and_pack():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    scale = np.full((4, 2), 0.25, np.float16)
    zero = np.full((4, 2), 8, np.uint8)
    parts = quantize_groupwise(w, 32, symmetric=False, scale=scale, zero=zero)
    want = np.clip(np.rint(w / 0.25) + 8, 0, 15).astype(np.uint8)
    np.testing.assert_array_equal(parts[""].reshape(4, 2, 16) & 15, want.reshape(4, 2, 32)[:, :, 0::2])
    codes = np.random.default_rng(1).integers(0, 16, (4, 50)).astype(np.uint8)
    p2 = pack_groupwise(codes, scale, zero, 32)
    deq = dequantize_groupwise(p2, (4, 50), 32)
    np.testing.assert_array_equal(deq, (codes.astype(np.float32) - 8) * 0.25)
    with pytest.raises(QuantizationError, match="block size 48 unsupported"):
        quantize_groupwise(w, 48, symmetric=True)
    with pytest.raises(QuantizationError, match="needs zero points"):
        quantize_groupwise(w, 32, symmetric=False, scale=scale)


def test_specs_sizes():
    specs = get_scheme("q4g32").specs("x.weight", (640, 2048))
    assert [(s.name, s.dtype, s.shape, s.nbytes) for s in specs] == [
        ("x.weight", "q4g32", (640, 2048), 640 * 64 * 16),
        ("x.weight.qscale", "f16", (640, 64), 640 * 64 * 2),
        ("x.weight.qzero", "u4", (640, 64), 640 * 32),
    ]
    specs = get_scheme("q4g128-sym").specs("x", (3, 129))
    assert [(s.dtype, s.nbytes) for s in specs] == [("q4g128", 3 * 2 * 64), ("f16", 3 * 2 * 2)]


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_semantics_match_onnxruntime_quantizer(block, sym):
    """onnxruntime's own block quantizer (MLAS, what MatMulNBitsQuantizer and the onnxruntime-genai
    builder use) is the reference for the RTN math: same scales up to f16 rounding (and the same
    sign convention), same codes / zero points except near rounding boundaries (we round codes with
    the stored f16 scale, MLAS with its f32 scale)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from cellm.quant.bitpack import unpack_nibbles

    rng = np.random.default_rng(block)
    n, k = 64, 512
    w = rng.standard_normal((n, k)).astype(np.float32)
    nb = k // block
    packed = np.zeros((n, nb, block // 2), np.uint8)
    scales = np.zeros(n * nb, np.float32)
    zp = np.zeros(n * ((nb + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, zp, block, n, k, sym)
    parts = get_scheme(f"q4g{block}{'-sym' if sym else ''}").quantize(w)
    ours = parts[".qscale"].astype(np.float32)
    ref = scales.reshape(n, nb)
    assert (np.sign(ours) == np.sign(ref)).all()
    assert (np.abs(ours - ref) <= np.abs(ref) * 2.0**-10).all()
    agree = (unpack_nibbles(parts[""], block) == unpack_nibbles(packed, block)).mean()
    assert agree >= 0.98, agree
    if not sym:
        assert (parts[".qzero"] == zp.reshape(n, -1)).mean() >= 0.95
