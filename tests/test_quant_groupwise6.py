"""Group-wise 6-bit (q6g32/64/128, asymmetric and symmetric).

Independent references: the codes are recomputed element by element from the documented formulas
with Python floats (f16 rounding through ``struct``'s IEEE half format) and packed into a Python
integer bit stream; onnxruntime's 8-bit MatMulNBits checks the ONNX mapping (tests/test_onnx_weights.py).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.errors import FormatError, QuantizationError
from cellm.format.constants import tensor_nbytes
from cellm.quant.bitpack import pack_sextets, unpack_sextets
from cellm.quant.schemes import dequantize_parts, get_scheme


def f16(x: float, up: bool = False) -> float:
    """IEEE half rounding (nearest even), or the next half away from zero when ``up`` and rounding lost magnitude."""
    h = struct.unpack("<e", struct.pack("<e", x))[0]
    if up and abs(h) < abs(x):
        bits = struct.unpack("<H", struct.pack("<e", h))[0]
        h = struct.unpack("<e", struct.pack("<H", bits + 1))[0]
    return h


def ref_block(vals: list[float], sym: bool) -> tuple[list[int], float, int]:
    """Codes, f16 scale, zero point of one block from the module docstring's formulas."""
    vals = [float(np.float32(v)) for v in vals]
    if sym:
        mx, mn = max(vals), min(vals)
        a = mx if abs(mx) > abs(mn) else mn
        s = f16(float(np.float32(a) / np.float32(-32.0))) or 1.0
        codes = [int(min(max(np.rint(np.float32(v) / np.float32(s)), -32), 31)) + 32 for v in vals]
        return codes, s, 32
    lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
    s = f16(float((np.float32(hi) - np.float32(lo)) / np.float32(63.0)), up=True)
    if s == 0:
        return [32] * len(vals), 1.0, 32
    zp = int(min(max(np.rint(np.float32(-lo) / np.float32(s)), 0), 63))
    codes = [int(min(max(np.rint(np.float32(v) / np.float32(s) + np.float32(zp)), 0), 63)) for v in vals]
    return codes, s, zp


def bitstream(codes: list[int]) -> bytes:
    v = sum(c << (6 * i) for i, c in enumerate(codes))
    return v.to_bytes(len(codes) * 6 // 8, "little")


@pytest.mark.parametrize("sym", [False, True])
def test_exact_bytes_against_independent_reference(sym):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 64)).astype(np.float32)
    w[1, :32] = 0.0  # all-zero block
    w[2, 32:] = np.abs(w[2, 32:])  # positive-only block (range extended to 0)
    name = "q6g32-sym" if sym else "q6g32"
    parts = get_scheme(name).quantize(w)
    assert parts[""].shape == (3, 2, 24) and parts[".qscale"].shape == (3, 2)
    assert (".qzero" in parts) is (not sym)
    for r in range(3):
        for j in range(2):
            codes, s, zp = ref_block(list(w[r, 32 * j:32 * (j + 1)]), sym)
            assert parts[""][r, j].tobytes() == bitstream(codes), (r, j)
            assert float(parts[".qscale"][r, j]) == s
            if not sym:
                assert int(parts[".qzero"][r, j]) == zp


def test_sextet_packing_round_trip_and_errors():
    u = np.arange(64, dtype=np.uint8).reshape(2, 32)
    p = pack_sextets(u)
    assert p.shape == (2, 24)
    assert p[0].tobytes() == bitstream(list(range(32)))
    assert np.array_equal(unpack_sextets(p, 32), u)
    with pytest.raises(QuantizationError, match="multiple of 4"):
        pack_sextets(np.zeros((2, 6), np.uint8))
    with pytest.raises(QuantizationError, match="6-bit codes"):
        unpack_sextets(np.zeros((2, 5), np.uint8), 8)


@pytest.mark.parametrize("scheme", ["q6g32", "q6g32-sym", "q6g64", "q6g128-sym"])
@pytest.mark.parametrize("k", [256, 200, 40])
def test_round_trip_and_error_bound(scheme, k):
    rng = np.random.default_rng(k)
    w = (rng.standard_normal((16, k)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    w[3] = 0.0
    sc = get_scheme(scheme)
    parts = sc.quantize(w)
    dq = sc.dequantize(parts, w.shape)
    assert dq.shape == w.shape and dq.dtype == np.float32
    err = np.abs(dq - w).max(axis=1)
    assert (err <= sc.error_bound(w)).all()
    assert np.array_equal(dq[3], np.zeros(k, np.float32))  # zeros stay exact
    # by container dtype alone (the reader's path)
    assert np.array_equal(dequantize_parts(sc.dtype, parts, w.shape), dq)
    # byte size = the dtype table's
    assert sum(v.nbytes for v in parts.values()) == sum(s.nbytes for s in sc.specs("w", w.shape))
    assert parts[""].nbytes == tensor_nbytes(sc.dtype, w.shape)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 130), st.floats(1e-4, 1e3), st.booleans())
def test_error_bound_property(n, k, scale, sym):
    w = (np.random.default_rng(n * 1000 + k).standard_normal((n, k)) * scale).astype(np.float32)
    sc = get_scheme("q6g32-sym" if sym else "q6g32")
    dq = sc.dequantize(sc.quantize(w), w.shape)
    assert (np.abs(dq - w).max(axis=1) <= sc.error_bound(w)).all()


def test_symmetric_bound_covers_f16_scale_rounding_down():
    """a/-32 that rounds DOWN in f16 makes the +31 clip on the other side exceed |s16| (found on the
    270M's v_proj): the bound must hold there too."""
    x = np.float32(32.0 * (1.0 + 2.0**-11 - 2.0**-20))  # x/32 rounds down to 1.0 in f16
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1] = -x, x
    sc = get_scheme("q6g32-sym")
    parts = sc.quantize(w)
    assert float(parts[".qscale"][0, 0]) == 1.0  # rounded down
    err = np.abs(sc.dequantize(parts, w.shape) - w).max()
    assert err > 1.0 + 2.0**-8  # what the first bound claimed
    assert err <= sc.error_bound(w)[0]


def test_six_bits_beat_four_bits():
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    e4 = np.abs(get_scheme("q4g32").dequantize(get_scheme("q4g32").quantize(w), w.shape) - w).mean()
    e6 = np.abs(get_scheme("q6g32").dequantize(get_scheme("q6g32").quantize(w), w.shape) - w).mean()
    assert e6 < e4 / 3.5  # 4x finer step


def test_rows_are_independent():
    w = np.random.default_rng(1).standard_normal((10, 96)).astype(np.float32)
    sc = get_scheme("q6g32")
    whole = sc.quantize(w)
    a, b = sc.quantize(w[:4]), sc.quantize(w[4:])
    for suf in whole:
        assert np.array_equal(whole[suf], np.concatenate([a[suf], b[suf]]))


def test_bad_input():
    sc = get_scheme("q6g32")
    with pytest.raises(QuantizationError, match="2-D"):
        sc.quantize(np.zeros(8, np.float32))
    w = np.zeros((2, 32), np.float32)
    w[1, 5] = np.nan
    with pytest.raises(QuantizationError, match=r"non-finite.*\[1, 5\]"):
        sc.quantize(w)
    with pytest.raises(QuantizationError, match="rows of length 0"):
        sc.quantize(np.zeros((2, 0), np.float32))
    with pytest.raises(FormatError, match="q6g32"):
        tensor_nbytes("q6g32", (2, 3, 4))


def test_sizes():
    # 0.75 byte codes + 2/32 scale + 1/32 zero point per weight
    specs = get_scheme("q6g32").specs("w", (262144, 640))
    assert sum(s.nbytes for s in specs) == 262144 * 20 * (24 + 2 + 1)
    assert [s.dtype for s in specs] == ["q6g32", "f16", "u8"]
    assert math.isclose(sum(s.nbytes for s in get_scheme("q6g32-sym").specs("w", (4, 64))) / 256, 26 / 32)


PROFILE = """
name = "q6-test"
description = "6-bit embedding, 6-bit symmetric MLP, i8 attention"
gate_class = "int4"

[[rules]]
pattern = 'model\\.embed_tokens\\.weight'
scheme = "q6g32"

[[rules]]
pattern = '.*mlp.*'
ndim = 2
scheme = "q6g64-sym"

[[rules]]
pattern = '.*self_attn.*_proj.*'
ndim = 2
scheme = "i8"

[[rules]]
pattern = '.*'
scheme = "f16"
"""


def test_convert_validate_and_run(tiny_ckpt, tmp_path):
    """A q6 profile converts, validates with --source numerics, and the runtime logits equal a float32
    forward over the scheme's dequantized weights."""
    from cellm.convert import convert
    from cellm.format.reader import CellmReader
    from cellm.runtime import load_model
    from cellm.runtime.model import GemmaModel
    from cellm.runtime.weights import DenseWeights
    from cellm.sources import open_source
    from cellm.validate import validate

    prof = tmp_path / "q6.toml"
    prof.write_text(PROFILE)
    res = convert(str(tiny_ckpt), prof, tmp_path / "q6.cellm")
    report = validate(res.path, source=str(tiny_ckpt))
    assert report.ok, report.problems
    src = open_source(str(tiny_ckpt))
    emb = "model.embed_tokens.weight"
    with CellmReader(res.path) as r:
        assert r.tensors[emb].dtype == "q6g32" and r.tensors[emb + ".qzero"].dtype == "u8"
        assert {"q6g32", "q6g64", "u8"} <= set(r.header["cellm_extensions"])
        down = "model.layers.0.mlp.down_proj.weight"
        assert r.tensors[down].dtype == "q6g64" and down + ".qzero" not in r.tensors
        deq = {n: r.dequantize(n) for n in r.tensors if not n.endswith((".qscale", ".qzero"))}
        for n in (emb, down):
            sc = get_scheme(r.header["cellm_schemes"][n])
            assert np.array_equal(deq[n], sc.dequantize(sc.quantize(src.load(n)), deq[n].shape))
    ids = np.array([2, 5, 9, 4, 7, 1], dtype=np.int64)
    m = load_model(res.path)
    got = m.forward(ids, m.new_state())
    ref = GemmaModel(DenseWeights(src.config, deq))
    want = ref.forward(ids, ref.new_state())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_validate_flags_zero_point_beyond_six_bits(tiny_ckpt, tmp_path):
    from cellm.convert import convert
    from cellm.format.reader import CellmReader
    from cellm.validate import validate

    prof = tmp_path / "q6.toml"
    prof.write_text(PROFILE)
    path = convert(str(tiny_ckpt), prof, tmp_path / "q6.cellm").path
    zname = "model.embed_tokens.weight.qzero"
    with CellmReader(path) as r:
        off = r.tensors[zname].offset
    data = bytearray(path.read_bytes())
    data[off + 3] = 200
    path.write_bytes(bytes(data))
    report = validate(path)
    assert not report.ok
    bad = [p for p in report.problems if p.tensor == zname]
    assert bad and "200" in bad[0].message and "63" in bad[0].message and bad[0].offset == off


def test_onnx_export_of_q6_artifact_matches_numpy_runtime(tiny_ckpt, tmp_path):
    """6-bit embedding (GatherBlockQuantized + LM head MatMulNBits, bits=8 with u8 zero points) and
    6-bit symmetric MLP run in onnxruntime and agree with the numpy runtime on the same artifact."""
    from cellm.convert import convert
    from cellm.onnx_export import export_onnx, load_ort_model
    from cellm.runtime import load_model

    prof = tmp_path / "q6.toml"
    prof.write_text(PROFILE)
    art = convert(str(tiny_ckpt), prof, tmp_path / "q6.cellm").path
    out = export_onnx(art, tmp_path / "onnx", accuracy_level=1)
    ids = np.array([2, 5, 9, 4, 7, 1, 3, 8], dtype=np.int64)
    ort_m = load_ort_model(out)
    got = ort_m.forward(ids, ort_m.new_state())
    ref = load_model(art)
    want = ref.forward(ids, ref.new_state())
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
