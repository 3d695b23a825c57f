"""Exact bytes of a tiny file, round trips of every dtype, and rejection of malformed files."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from cellm.errors import FormatError
from cellm.format import CellmReader, CellmWriter, TensorSpec, header_from_config, make_spec, write_cellm
from cellm.format.constants import DTYPES, MAX_HEADER_LEN
from cellm.quant.schemes import SCHEMES, get_scheme

BASE = {
    "model_type": "gemma3_text", "vocab_size": 8, "hidden_dim": 4, "intermediate_size": 6,
    "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
}


def expected_bytes(header: dict, tensors: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """Independent layout: magic, u8 version, u32 LE length, JSON, zero pad to 64, aligned data."""
    tensors = sorted(tensors)

    def build(data_start):
        entries, off = [], data_start
        for name, dtype, shape, data in tensors:
            off = -(-off // 64) * 64
            entries.append({"name": name, "dtype": dtype, "shape": shape, "offset_bytes": off,
                            "nbytes": len(data)})
            off += len(data)
        h = dict(header)
        h["tensors"] = entries
        return json.dumps(h, separators=(",", ":")).encode()

    start = 0
    while True:
        blob = build(start)
        new = -(-(10 + len(blob)) // 64) * 64
        if new == start:
            break
        start = new
    out = bytearray(b"CELLM" + bytes([1]) + struct.pack("<I", len(blob)) + blob)
    for e, (_, _, _, data) in zip(json.loads(blob)["tensors"], tensors):
        out += bytes(e["offset_bytes"] - len(out))
        out += data
    return bytes(out)


def test_exact_bytes_two_tensors(tmp_path):
    a = np.array([1.0, -2.0, 0.5], dtype=np.float16)  # 6 bytes
    b = np.arange(-3, 3, dtype=np.int8).reshape(2, 3)
    header = dict(BASE, tensors=[])
    p = tmp_path / "two.cellm"
    # given out of order: the writer must sort by name
    with CellmWriter(p, header, [make_spec("b.weight", "i8", (2, 3)), make_spec("a.weight", "f16", (3,))]) as w:
        assert w.names == ["a.weight", "b.weight"]
        w.write("a.weight", a)
        w.write("b.weight", b.tobytes())
    want = expected_bytes(BASE, [("a.weight", "f16", [3], a.tobytes()), ("b.weight", "i8", [2, 3], b.tobytes())])
    got = p.read_bytes()
    assert got == want
    # spot-check the layout facts independently of the helper
    assert got[:6] == b"CELLM\x01"
    hlen = struct.unpack("<I", got[6:10])[0]
    hdr = json.loads(got[10:10 + hlen])
    offs = [t["offset_bytes"] for t in hdr["tensors"]]
    assert offs[0] == -(-(10 + hlen) // 64) * 64 and offs[1] == offs[0] + 64
    assert all(x == 0 for x in got[10 + hlen: offs[0]])
    assert got[offs[0]: offs[0] + 6] == a.tobytes() and all(x == 0 for x in got[offs[0] + 6: offs[1]])
    assert len(got) == offs[1] + 6
    with CellmReader(p) as r:
        np.testing.assert_array_equal(r.view("a.weight"), a)
        np.testing.assert_array_equal(r.view("b.weight"), b)
        assert r.raw("b.weight").tobytes() == b.tobytes()
        assert r.data_start == offs[0] and r.file_size == len(got)
        assert "cellm_extensions" not in r.header


RTN_SCHEMES = ["f16", "i8", "i4"] + [f"q{n}g{b}{v}" for n in (4, 6) for b in (32, 64, 128) for v in ("", "-sym")]


def test_rtn_schemes_registered():
    assert set(RTN_SCHEMES) <= set(SCHEMES)


@pytest.mark.parametrize("scheme", RTN_SCHEMES)
@pytest.mark.parametrize("shape", [(3, 70), (4, 32), (1, 129)])
def test_round_trip_every_scheme(tmp_path, scheme, shape):
    sc = get_scheme(scheme)
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    parts = sc.quantize(w)
    arrays = {}
    for spec in sc.specs("m.weight", shape):
        data = parts[spec.name[len("m.weight"):]]
        assert data.nbytes == spec.nbytes
        arrays[spec.name] = (spec.dtype, spec.shape, data)
    arrays["m.norm"] = ("f16", (5,), np.ones(5, np.float16))
    p = write_cellm(tmp_path / "rt.cellm", dict(BASE), arrays)
    with CellmReader(p) as r:
        for name in arrays:
            t = r.tensors[name]
            assert t.offset % 64 == 0
            if name.endswith(".qscale") or name.endswith(".qzero"):
                continue
            v = r.view(name)
            assert v.dtype == DTYPES[t.dtype].storage and v.nbytes == t.nbytes
        got_parts = r.scheme_parts("m.weight")
        assert sorted(got_parts) == sorted(parts)
        for k in parts:
            np.testing.assert_array_equal(got_parts[k].reshape(parts[k].shape), parts[k])
        deq = r.dequantize("m.weight")
        assert deq.dtype == np.float32 and deq.shape == shape
        np.testing.assert_array_equal(deq, sc.dequantize(parts, shape))
        ext = sorted({s.dtype for s in sc.specs("m.weight", shape) if DTYPES[s.dtype].is_extension})
        assert r.extensions == ext
        assert r.header.get("cellm_extensions", []) == ext


def test_u4_and_1d_i4_dtypes_round_trip(tmp_path):
    u = np.array([[0x21, 0x03]], dtype=np.uint8)  # logical [1, 3]
    p = write_cellm(tmp_path / "u.cellm", dict(BASE), {"z": ("u4", (1, 3), u), "y": ("i4", (3,), u[0])})
    with CellmReader(p) as r:
        np.testing.assert_array_equal(r.view("z"), u)
        assert r.view("y").shape == (2,)
        with pytest.raises(FormatError, match="u4"):
            r.dequantize("z")


def test_u8_zero_points_are_a_companion_dtype(tmp_path):
    z = np.array([[0, 63, 7]], dtype=np.uint8)
    p = write_cellm(tmp_path / "u8.cellm", dict(BASE), {"z": ("u8", (1, 3), z)})
    with CellmReader(p) as r:
        np.testing.assert_array_equal(r.view("z"), z)
        assert r.extensions == ["u8"]
        with pytest.raises(FormatError, match="u8"):
            r.dequantize("z")


def test_header_from_config_has_upstream_keys(tmp_path):
    from cellm.synthetic import tiny_config

    cfg = tiny_config()
    raw = cfg.to_hf_dict(5)
    h = header_from_config(cfg, raw, cellm_profile="int8-v1")
    assert h["rope_theta"] == 1_000_000.0 and h["hidden_dim"] == cfg.hidden_size
    assert h["source_text_config"] == raw and h["eos_token_id"] == cfg.eos_token_ids[0]
    assert list(h)[-1] == "tensors" and h["cellm_profile"] == "int8-v1"
    p = write_cellm(tmp_path / "c.cellm", h, {"x": ("f16", (2,), np.zeros(2, np.float16))})
    with CellmReader(p) as r:
        assert r.config == cfg
        # fallback: no source_text_config -> built from the upstream keys
        h2 = {k: v for k, v in h.items() if k != "source_text_config"}
    p2 = write_cellm(tmp_path / "c2.cellm", h2, {"x": ("f16", (2,), np.zeros(2, np.float16))})
    with CellmReader(p2) as r:
        assert r.config.hidden_size == cfg.hidden_size and r.config.rope_global.theta == 1e6


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture
def good(tmp_path):
    a = np.arange(6, dtype=np.float16)
    b = np.arange(4, dtype=np.int8).reshape(2, 2)
    s = np.ones(2, np.float16)
    return write_cellm(tmp_path / "good.cellm", dict(BASE),
                       {"a": ("f16", (6,), a), "b": ("i8", (2, 2), b), "b.qscale": ("f16", (2,), s)})


def _with_header(path, mutate, out):
    data = path.read_bytes()
    hlen = struct.unpack("<I", data[6:10])[0]
    h = json.loads(data[10:10 + hlen])
    mutate(h)
    blob = json.dumps(h, separators=(",", ":")).encode()
    # keep absolute offsets valid: the data region must start at the same place
    pad = -(-(10 + hlen) // 64) * 64
    assert 10 + len(blob) <= pad, "mutated header must fit before the data"
    new = b"CELLM\x01" + struct.pack("<I", len(blob)) + blob + bytes(pad - 10 - len(blob)) + data[pad:]
    out.write_bytes(new)
    return out


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: d[:9], "smaller than"),
        (lambda d: b"", "smaller than"),
        (lambda d: b"CELLX" + d[5:], "bad magic"),
        (lambda d: d[:5] + b"\x02" + d[6:], "version 2"),
        (lambda d: d[:6] + struct.pack("<I", MAX_HEADER_LEN + 1) + d[10:], "exceeds the limit"),
        (lambda d: d[:6] + struct.pack("<I", len(d)) + d[10:], "past the end"),
        (lambda d: d[:-3], "past the end of the file"),
        (lambda d: d[:10] + b"x" + d[11:], "does not parse"),
    ],
    ids=["truncated", "empty", "magic", "version", "huge-header", "header-eof", "tensor-eof", "json"],
)
def test_reader_rejects(good, tmp_path, corrupt, match):
    bad = tmp_path / "bad.cellm"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(FormatError, match=match):
        CellmReader(bad)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h: h.update(tensors={}), "'tensors' must be a list"),
        (lambda h: h["tensors"][0].update(shape=[-1]), "shape"),
        (lambda h: h["tensors"][0].update(offset_bytes="1"), "offset_bytes"),
        (lambda h: h["tensors"][1].update(nbytes=True), "nbytes"),
        (lambda h: h["tensors"][1].update(name="a"), "duplicate tensor name 'a'"),
        (lambda h: h["tensors"][0].update(offset_bytes=10**6), "tensor 'a' at offset 1000000"),
    ],
    ids=["tensors-type", "neg-shape", "offset-type", "nbytes-bool", "duplicate", "offset-eof"],
)
def test_reader_rejects_bad_entries(good, tmp_path, mutate, match):
    with pytest.raises(FormatError, match=match):
        CellmReader(_with_header(good, mutate, tmp_path / "bad.cellm"))


def test_unknown_dtype_opens_but_view_raises(good, tmp_path):
    p = _with_header(good, lambda h: h["tensors"][0].update(dtype="bf16"), tmp_path / "u.cellm")
    with CellmReader(p) as r:  # upstream tolerates unknown dtypes on load
        assert r.tensors["a"].dtype == "bf16"
        for fn in (r.view, r.dequantize, r.scheme_parts):
            with pytest.raises(FormatError, match=r"unsupported dtype 'bf16' of tensor 'a'; supported: f16"):
                fn("a")
        np.testing.assert_array_equal(r.dequantize("b"), np.arange(4, dtype=np.float32).reshape(2, 2))


def test_nbytes_mismatch_in_file_and_companion_shape(good, tmp_path):
    p = _with_header(good, lambda h: h["tensors"][0].update(nbytes=10), tmp_path / "n.cellm")
    with CellmReader(p) as r, pytest.raises(FormatError, match="nbytes 10 does not match dtype f16 shape"):
        r.view("a")
    p = _with_header(good, lambda h: h["tensors"][2].update(shape=[1], nbytes=2), tmp_path / "c.cellm")
    with CellmReader(p) as r, pytest.raises(FormatError, match="companion 'b.qscale'"):
        r.dequantize("b")
    p = _with_header(good, lambda h: h["tensors"].pop(2), tmp_path / "m.cellm")
    with CellmReader(p) as r, pytest.raises(FormatError, match="needs companion 'b.qscale', which is missing"):
        r.dequantize("b")


def test_writer_rejects_bad_specs(tmp_path):
    p = tmp_path / "w.cellm"
    with pytest.raises(FormatError, match="duplicate tensor name 'x'"):
        CellmWriter(p, BASE, [make_spec("x", "f16", (2,)), make_spec("x", "f16", (2,))])
    with pytest.raises(FormatError, match="unsupported dtype 'f32'"):
        CellmWriter(p, BASE, [TensorSpec("x", "f32", (2,), 8)])
    with pytest.raises(FormatError, match="nbytes 5 does not match dtype f16 shape"):
        CellmWriter(p, BASE, [TensorSpec("x", "f16", (2,), 5)])
    with pytest.raises(FormatError, match="q4g32 needs 2..2 dimensions"):
        make_spec("x", "q4g32", (64,))
    with pytest.raises(FormatError, match="missing required key 'rope_theta'"):
        CellmWriter(p, {k: v for k, v in BASE.items() if k != "rope_theta"}, [])
    with pytest.raises(FormatError, match="'num_heads'=True must be int"):
        CellmWriter(p, dict(BASE, num_heads=True), [])
    with pytest.raises(FormatError, match="'eos_token_id'=\\[1, 106\\] must be u32"):
        CellmWriter(p, dict(BASE, eos_token_id=[1, 106]), [])
    w = CellmWriter(p, BASE, [make_spec("x", "f16", (2,)), make_spec("y", "i8", (3,))])
    with pytest.raises(FormatError, match="write\\('y'\\) out of order: expected tensor 'x'"):
        w.write("y", np.zeros(3, np.int8))
    with pytest.raises(FormatError, match="tensor 'x' \\(f16 \\[2\\]\\): got 6 bytes, expected 4"):
        w.write("x", np.zeros(3, np.float16))
    with pytest.raises(FormatError, match="got a float32 array, expected float16 storage"):
        w.write("x", np.zeros(1, np.float32))
    w.write("x", np.zeros(2, np.float16))
    with pytest.raises(FormatError, match="1 tensor\\(s\\) not written, next 'y'"):
        w.close()
    assert os.listdir(tmp_path) == []


def test_writer_is_atomic(tmp_path):
    p = tmp_path / "atomic.cellm"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with CellmWriter(p, BASE, [make_spec("x", "f16", (2,)), make_spec("y", "f16", (2,))]) as w:
            w.write("x", np.zeros(2, np.float16))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["atomic.cellm"] and p.read_bytes() == b"old"
    with CellmWriter(p, BASE, [make_spec("x", "f16", (2,))]) as w:
        w.write("x", np.ones(2, np.float16))
        assert p.read_bytes() == b"old"  # nothing visible before close()
    assert sorted(os.listdir(tmp_path)) == ["atomic.cellm"]
    with CellmReader(p) as r:
        np.testing.assert_array_equal(r.view("x"), np.ones(2, np.float16))


def test_write_part_streams_row_chunks(tmp_path):
    a = np.arange(12, dtype=np.int8).reshape(4, 3)
    s = np.ones(4, np.float16)
    specs = [make_spec("a", "i8", (4, 3)), make_spec("a.qscale", "f16", (4,))]
    p1, p2 = tmp_path / "one.cellm", tmp_path / "parts.cellm"
    write_cellm(p1, BASE, {"a": ("i8", (4, 3), a), "a.qscale": ("f16", (4,), s)})
    with CellmWriter(p2, BASE, specs) as w:
        w.write_part("a", a[:1], first=True, last=False)
        with pytest.raises(FormatError, match="while tensor 'a' is being written in pieces"):
            w.write("a", a)
        w.write_part("a", a[1:3], first=False, last=False)
        w.write_part("a", a[3:], first=False, last=True)
        w.write_part("a.qscale", s, first=True, last=True)
    assert p1.read_bytes() == p2.read_bytes()
    w = CellmWriter(tmp_path / "bad.cellm", BASE, specs)
    with pytest.raises(FormatError, match="first piece was not marked first=True"):
        w.write_part("a", a[:1], first=False, last=False)
    w.write_part("a", a[:2], first=True, last=False)
    with pytest.raises(FormatError, match="pieces total 9 bytes, expected 12"):
        w.write_part("a", a[2:3], first=False, last=True)
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["one.cellm", "parts.cellm"]


@pytest.mark.parametrize("style", [4, 5])
def test_header_from_multimodal_config(tmp_path, style):
    """A gemma3 (multimodal) wrapper with a sparse text_config: the header's source_text_config
    alone must rebuild the same GemmaTextConfig."""
    from cellm.config import GemmaTextConfig
    from cellm.synthetic import tiny_config

    cfg = tiny_config()
    full = cfg.to_hf_dict(style)
    sparse = {k: full[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "query_pre_attn_scalar", "sliding_window", "layer_types",
                                   "max_position_embeddings", "rms_norm_eps")}
    sparse.update({k: full[k] for k in full if k.startswith("rope")})
    raw = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "text_config": sparse, "vision_config": {"hidden_size": 8}}
    parsed = GemmaTextConfig.from_hf(raw)
    h = header_from_config(parsed, raw)
    assert h["source_model_type"] == "gemma3" and h["source_architectures"] == ["Gemma3ForConditionalGeneration"]
    assert h["source_text_config"]["model_type"] == "gemma3_text"
    p = write_cellm(tmp_path / "mm.cellm", h, {"x": ("f16", (1,), np.zeros(1, np.float16))})
    with CellmReader(p) as r:
        assert r.config == parsed


def test_written_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_cellm(tmp_path / "m.cellm", BASE, {"x": ("f16", (1,), np.zeros(1, np.float16))})
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("stc", [
    {"model_type": "gemma3_text", "hidden_size": "x"},
    {"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 6,
     "num_hidden_layers": 1, "num_attention_heads": 1, "rms_norm_eps": "tiny"},
    {"model_type": "llama"},
])
def test_bad_source_text_config_is_a_cellm_error(tmp_path, stc):
    from cellm.errors import CellmError

    p = write_cellm(tmp_path / "c.cellm", dict(BASE, source_text_config=stc),
                    {"x": ("f16", (1,), np.zeros(1, np.float16))})
    with CellmReader(p) as r, pytest.raises(CellmError):
        r.config
