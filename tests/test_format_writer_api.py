"""CellmWriter's public chunked-write API: tensor(name) sinks, write_tensor_chunks, digest, writeback."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from cellm.errors import FormatError
from cellm.format import CellmReader
from cellm.format.constants import make_spec
from cellm.format.writer import CellmWriter, write_cellm

BASE = dict(model_type="gemma3_text", vocab_size=8, hidden_dim=4, intermediate_size=8, num_layers=1,
            num_heads=1, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e6, bos_token_id=2,
            eos_token_id=1, max_position_embeddings=16, tie_word_embeddings=True, tensors=[])


def _arrays():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 127, size=(7, 5), dtype=np.int8)
    s = rng.standard_normal(7).astype(np.float16)
    b = rng.standard_normal(3).astype(np.float16)
    return {"a": ("i8", (7, 5), a), "a.qscale": ("f16", (7,), s), "b": ("f16", (3,), b)}


def test_chunked_writes_equal_whole_writes(tmp_path):
    arr = _arrays()
    whole = write_cellm(tmp_path / "whole.cellm", BASE, arr).read_bytes()
    specs = [make_spec(n, dt, shp) for n, (dt, shp, _) in arr.items()]
    p = tmp_path / "chunks.cellm"
    with CellmWriter(p, BASE, specs, digest=True) as w:
        assert w.names == ["a", "a.qscale", "b"]
        with w.tensor("a") as t:
            for r0 in range(0, 7, 3):
                t.write(arr["a"][2][r0:r0 + 3])
            assert t.written == 35
        w.write_tensor_chunks("a.qscale", [arr["a.qscale"][2][:2].tobytes(), memoryview(arr["a.qscale"][2][2:])])
        t = w.tensor("b")
        t.write(arr["b"][2])
        t.close()
    data = p.read_bytes()
    assert data == whole
    assert w.sha256 == hashlib.sha256(data).hexdigest() and w.nbytes == len(data)
    with CellmReader(p) as r:
        np.testing.assert_array_equal(r.view("a"), arr["a"][2])


def test_chunk_byte_counts_checked_against_spec(tmp_path):
    arr = _arrays()
    specs = [make_spec(n, dt, shp) for n, (dt, shp, _) in arr.items()]
    w = CellmWriter(tmp_path / "bad.cellm", BASE, specs)
    with pytest.raises(FormatError, match=r"tensor\('b'\) out of order: expected tensor 'a' next"):
        w.tensor("b")
    t = w.tensor("a")
    with pytest.raises(FormatError, match=r"tensor\('a.qscale'\) while tensor 'a' is being written in pieces"):
        w.tensor("a.qscale")
    with pytest.raises(FormatError, match=r"write\('a'\) while tensor 'a' is being written in pieces"):
        w.write("a", arr["a"][2])
    t.write(arr["a"][2][:6])
    with pytest.raises(FormatError, match=r"tensor 'a' \(i8 \[7, 5\]\): pieces total 40 bytes, expected 35"):
        t.write(arr["a"][2][:2])  # 30 + 10 > 35
    with pytest.raises(FormatError, match="pieces total 30 bytes, expected 35"):
        t.close()
    with pytest.raises(FormatError, match="got a float16 array, expected int8 storage"):
        t.write(arr["b"][2])
    with pytest.raises(FormatError, match="3 tensor\\(s\\) not written, next 'a'"):
        w.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(FormatError, match="on a closed writer"):
        w.tensor("a")
    w2 = CellmWriter(tmp_path / "x.cellm", BASE, specs)
    with pytest.raises(FormatError, match="pieces total 34 bytes, expected 35"):
        w2.write_tensor_chunks("a", [arr["a"][2].tobytes()[:34]])
    with pytest.raises(FormatError, match="sha256 needs"):
        _ = w2.sha256
    w2.abort()
    assert os.listdir(tmp_path) == []


def test_background_writeback_keeps_bytes(tmp_path):
    """With a tiny sync_every, writeback threads run during the writes; the file is the same."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, size=(64, 1024), dtype=np.uint8).view(np.int8)
    arrays = {"a": ("i8", a.shape, a), "z": ("f16", (5,), np.ones(5, np.float16))}
    ref = write_cellm(tmp_path / "ref.cellm", BASE, arrays).read_bytes()
    specs = [make_spec(n, dt, shp) for n, (dt, shp, _) in arrays.items()]
    with CellmWriter(tmp_path / "s.cellm", BASE, specs, sync_every=4096, digest=True) as w:
        w.write_tensor_chunks("a", (a[i:i + 4] for i in range(0, 64, 4)))
        w.write("z", arrays["z"][2])
    assert (tmp_path / "s.cellm").read_bytes() == ref
    assert w.sha256 == hashlib.sha256(ref).hexdigest()


def test_sink_write_after_close_or_abort(tmp_path):
    arr = _arrays()
    specs = [make_spec(n, dt, shp) for n, (dt, shp, _) in arr.items()]
    w = CellmWriter(tmp_path / "a.cellm", BASE, specs)
    t = w.tensor("a")
    t.write(arr["a"][2])
    t.close()
    with pytest.raises(FormatError, match="write after its last piece"):
        t.write(b"x")
    t2 = w.tensor("a.qscale")
    w.abort()
    with pytest.raises(FormatError, match="on a closed writer"):
        t2.write(arr["a.qscale"][2])
    assert os.listdir(tmp_path) == []
