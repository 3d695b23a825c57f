"""Hypothesis fuzz: any byte flip / truncation / splice of a valid file either loads (and every
tensor can be viewed and dequantized or refused with FormatError) or raises FormatError — never
another exception."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellm.errors import CellmError, FormatError
from cellm.format import CellmReader, write_cellm
from cellm.quant.schemes import get_scheme

BASE = {
    "model_type": "gemma3_text", "vocab_size": 8, "hidden_dim": 4, "intermediate_size": 6,
    "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
}


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"n": ("f16", (3,), np.ones(3, np.float16))}
    for scheme, name in (("i8", "a"), ("i4", "b"), ("q4g32", "c"), ("q4g32-sym", "d")):
        sc = get_scheme(scheme)
        w = rng.standard_normal((2, 40)).astype(np.float32)
        parts = sc.quantize(w)
        for spec in sc.specs(name, w.shape):
            arrays[spec.name] = (spec.dtype, spec.shape, parts[spec.name[len(name):]])
    p = write_cellm(tmp_path_factory.mktemp("fz") / "v.cellm", BASE, arrays)
    return p.read_bytes()


def _exercise(path) -> None:
    try:
        r = CellmReader(path)
    except FormatError:
        return
    with r:
        _ = r.extensions
        try:
            _ = r.config
        except CellmError:
            pass
        for name in list(r.tensors):
            for fn in (r.raw, r.view, r.scheme_parts, r.dequantize):
                try:
                    fn(name)
                except FormatError:
                    pass


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("splice"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=16))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_fuzz_never_crashes(valid_bytes, tmp_path, m):
    data = bytearray(valid_bytes)
    kind, arg = m
    if kind == "flip":
        for pos, x in arg:
            data[pos % len(data)] ^= x
    elif kind == "truncate":
        data = data[: arg % (len(data) + 1)]
    else:
        pos, blob = arg
        pos %= len(data)
        data[pos: pos + len(blob)] = blob
    p = tmp_path / "f.cellm"
    p.write_bytes(bytes(data))
    _exercise(p)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hdr=st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.sampled_from(
        ["tensors", "name", "dtype", "shape", "offset_bytes", "nbytes", "x", "source_text_config",
         "model_type", "hidden_size", "rms_norm_eps", "rope_parameters", "layer_types"]), c, max_size=6)),
    max_leaves=20))
def test_fuzz_header_json(tmp_path, hdr):
    """Arbitrary JSON headers (and tensors entries) followed by some data never crash the reader."""
    import json
    import struct

    for h in (hdr, {"tensors": hdr if isinstance(hdr, list) else [hdr]}):
        blob = json.dumps(h).encode()
        p = tmp_path / "h.cellm"
        p.write_bytes(b"CELLM\x01" + struct.pack("<I", len(blob)) + blob + bytes(256))
        _exercise(p)


def test_deeply_nested_header(tmp_path):
    import struct

    blob = b"[" * 100000 + b"]" * 100000
    p = tmp_path / "deep.cellm"
    p.write_bytes(b"CELLM\x01" + struct.pack("<I", len(blob)) + blob)
    with pytest.raises(FormatError):
        CellmReader(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(
    st.integers(0, 20),
    st.sampled_from(["dtype", "shape", "offset_bytes", "nbytes", "name"]),
    st.one_of(
        st.sampled_from(["f16", "i8", "i4", "u4", "q4g32", "q4g64", "q4g128", "bf16", ""]),
        st.lists(st.integers(0, 300), max_size=3),
        st.integers(0, 2000),
        st.sampled_from(["a", "b", "c", "c.qzero", "c.qscale", "d.qscale", "n"]),
    )), min_size=1, max_size=4))
def test_fuzz_plausible_entries(valid_bytes, tmp_path, edits):
    """Well-typed but inconsistent tensor entries (dtype/shape/nbytes/companions) never crash."""
    import json
    import struct

    hlen = struct.unpack("<I", valid_bytes[6:10])[0]
    h = json.loads(valid_bytes[10:10 + hlen])
    for i, key, value in edits:
        h["tensors"][i % len(h["tensors"])][key] = value
    blob = json.dumps(h, separators=(",", ":")).encode()
    data = b"CELLM\x01" + struct.pack("<I", len(blob)) + blob + valid_bytes[10 + hlen:]
    p = tmp_path / "e.cellm"
    p.write_bytes(data)
    _exercise(p)
