"""Stored bits -> MatMulNBits / GatherBlockQuantized inputs, checked by onnxruntime itself.

For every cellm quantized dtype the exporter's initializers, run through real onnxruntime kernels
(MatMulNBits at accuracy_level 1 on an identity matrix, GatherBlockQuantized over every row), must
reproduce ``scheme.dequantize`` (what ``CellmReader.dequantize`` returns) bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cellm.errors import ExportError
from cellm.onnx_export.weights import NBits, dequantize_nbits, nbits_from_storage, rowwise_block
from cellm.quant.schemes import get_scheme

CASES = [
    ("i8", (48, 64)), ("i8", (8, 40)), ("i4", (48, 640)), ("i4", (40, 96)), ("i4", (8, 40)), ("i4", (10, 33)),
    ("q4g32", (40, 96)), ("q4g32-sym", (40, 96)), ("q4g32", (12, 80)), ("q4g64", (36, 160)),
    ("q4g128", (20, 640)), ("q4g128-sym", (20, 200)),
    ("q6g32", (40, 96)), ("q6g32-sym", (40, 96)), ("q6g32", (12, 80)), ("q6g64", (36, 160)),
    ("q6g128", (20, 640)), ("q6g128-sym", (20, 200)),
]


def _session(node: onnx.NodeProto, inp: onnx.ValueInfoProto, inits: list) -> ort.InferenceSession:
    g = helper.make_graph([node], "g", [inp], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_matmulnbits_weight(w: NBits) -> np.ndarray:
    """W [N, K] as onnxruntime's MatMulNBits sees it: I_K @ W^T, transposed (exact: one non-zero term)."""
    ins = ["A", "B", "S"] + (["Z"] if w.zero_points is not None else [])
    inits = [numpy_helper.from_array(w.b, "B"), numpy_helper.from_array(w.scales, "S")]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=w.k, N=w.n, bits=w.bits,
                            block_size=w.block_size, accuracy_level=1)
    s = _session(node, helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", w.k]), inits)
    return s.run(None, {"A": np.eye(w.k, dtype=np.float32)})[0].T


def ort_gather_rows(w: NBits) -> np.ndarray:
    row = w.n_blocks * w.block_size * w.bits // 8
    ins = ["D", "I", "S"] + (["Z"] if w.zero_points is not None else [])
    inits = [numpy_helper.from_array(w.b.reshape(w.n, row), "D"), numpy_helper.from_array(w.scales, "S")]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points, "Z"))
    node = helper.make_node("GatherBlockQuantized", ins, ["Y"], domain="com.microsoft", bits=w.bits,
                            block_size=w.block_size, gather_axis=0, quantize_axis=1)
    s = _session(node, helper.make_tensor_value_info("I", TensorProto.INT64, ["M"]), inits)
    return s.run(None, {"I": np.arange(w.n, dtype=np.int64)})[0][:, : w.k]


@pytest.mark.parametrize("scheme,shape", CASES, ids=[f"{s}-{a}x{b}" for s, (a, b) in CASES])
def test_onnxruntime_dequantizes_stored_bits_exactly(scheme, shape):
    rng = np.random.default_rng(abs(hash((scheme, shape))) % 2**32)
    w = rng.normal(size=shape).astype(np.float32)
    w[0, : min(5, shape[1])] = 0.0  # zeros and a partly-zero block
    sch = get_scheme(scheme)
    parts = sch.quantize(w)
    ref = sch.dequantize(parts, shape)  # what CellmReader.dequantize returns
    nb = nbits_from_storage("w", sch.dtype, parts, shape)
    assert nb.bits == (8 if scheme == "i8" or scheme.startswith("q6g") else 4)
    if scheme.startswith("q6g"):
        assert nb.block_size == int(scheme[3:].split("-")[0])
        assert (nb.zero_points is None) == scheme.endswith("-sym")
    elif scheme.startswith("q4g"):
        assert nb.block_size == int(scheme[3:].split("-")[0])
        assert (nb.zero_points is None) == scheme.endswith("-sym")
        np.testing.assert_array_equal(nb.b.reshape(-1), np.asarray(parts[""]).reshape(-1))  # the stored bytes
    else:
        assert nb.zero_points is None  # default zero point 8 / 128
        assert nb.block_size == rowwise_block(shape[1])
    assert np.array_equal(dequantize_nbits(nb), ref)
    assert np.array_equal(ort_matmulnbits_weight(nb), ref)
    assert np.array_equal(ort_gather_rows(nb), ref)


def test_rowwise_block_sizes():
    assert rowwise_block(640) == 128 and rowwise_block(2048) == 128 and rowwise_block(96) == 32
    assert rowwise_block(80) == 16 and rowwise_block(40) == 32  # 40: no power of two >= 16 divides -> padded 32


def test_i4_byte_aligned_rows_are_reshaped_not_repacked():
    w = np.random.default_rng(0).normal(size=(6, 256)).astype(np.float32)
    parts = get_scheme("i4").quantize(w)
    nb = nbits_from_storage("w", "i4", parts, (6, 256))
    np.testing.assert_array_equal(nb.b.reshape(6, -1), parts[""])


def test_unmappable_dtype_is_an_export_error():
    with pytest.raises(ExportError, match="u4"):
        nbits_from_storage("model.layers.0.mlp.up_proj.weight", "u4", {"": np.zeros((2, 2), np.uint8)}, (2, 4))
    with pytest.raises(ExportError, match="2-D"):
        nbits_from_storage("x", "i8", {"": np.zeros(4, np.int8), ".qscale": np.ones(1, np.float16)}, (4,))
