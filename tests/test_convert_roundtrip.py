"""convert -> read back: every tensor equals an independent reference of the v1 / q4g formulas;
header keys, sort order, determinism, atomicity and sidecars."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cellm.convert import convert
from cellm.errors import CellmError
from cellm.names import expected_tensors
from cellm.synthetic import make_checkpoint, random_weights, tiny_config

PROFILES = ["int8-v1", "mixed-int4-v1", "int4-v1", "mixed-int4", "f16"]


# ----------------------------------------------------------------------------- independent reader
def read_cellm(path: Path):
    """Parse a .cellm v1 file with nothing but struct/json/numpy (independent of cellm.format)."""
    data = path.read_bytes()
    assert data[:5] == b"CELLM" and data[5] == 1
    (hlen,) = struct.unpack("<I", data[6:10])
    header = json.loads(data[10 : 10 + hlen])
    raw = {}
    for t in header["tensors"]:
        assert t["offset_bytes"] % 64 == 0
        raw[t["name"]] = (t, data[t["offset_bytes"] : t["offset_bytes"] + t["nbytes"]])
    return header, raw


# ----------------------------------------------------------------------------- reference formulas
def round_half_away(x: np.ndarray) -> np.ndarray:
    """Exact float32 round-half-away-from-zero via trunc and the exact fractional part."""
    r = np.trunc(x)
    frac = np.abs(x - r)  # exact in float32 for |x| < 2**23
    return r + np.sign(x) * (frac >= 0.5)


def ref_rowwise(w: np.ndarray, qmax: int):
    """Upstream per-row symmetric: scale = m/qmax in f32 (1.0 if m == 0); q uses the f32 scale."""
    w = w.astype(np.float32)
    m = np.abs(w).max(axis=1)
    scale = np.where(m > 0, (m / np.float32(qmax)).astype(np.float32), np.float32(1.0)).astype(np.float32)
    q = np.clip(round_half_away((w / scale[:, None]).astype(np.float32)), -qmax, qmax).astype(np.int32)
    return q, scale.astype(np.float16)


def unpack_i4(raw: bytes, rows: int, cols: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8).reshape(rows, (cols + 1) // 2)
    out = np.empty((rows, 2 * b.shape[1]), dtype=np.int32)
    out[:, 0::2] = b & 0x0F
    out[:, 1::2] = b >> 4
    return out[:, :cols]


def ref_q4g_asym(w: np.ndarray, block: int):
    """MatMulNBits-style asymmetric RTN as documented: range includes 0, f16 scale rounded up."""
    n, k = w.shape
    nb = -(-k // block)
    pad = np.zeros((n, nb * block), np.float32)
    pad[:, :k] = w
    b = pad.reshape(n, nb, block)
    lo = np.minimum(b.min(axis=2), 0).astype(np.float32)
    hi = np.maximum(b.max(axis=2), 0).astype(np.float32)
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    s16 = scale.astype(np.float16)
    up = s16.astype(np.float32) < scale
    s16[up] = np.nextafter(s16[up], np.float16(np.inf))
    zero_blk = (hi - lo) == 0
    s16[zero_blk] = 1.0
    sf = s16.astype(np.float32)
    zp = np.clip(np.rint(-lo / sf), 0, 15).astype(np.float32)
    zp[zero_blk] = 8
    q = np.clip(np.rint(b / sf[..., None] + zp[..., None]), 0, 15)
    deq = ((q - zp[..., None]) * sf[..., None]).reshape(n, nb * block)[:, :k]
    return deq.astype(np.float32), s16


def stored_dequant(t, raw, parts):
    """Dequantize a stored tensor from its bytes with the formulas of the notes / FORMAT.md."""
    shape = tuple(t["shape"])
    if t["dtype"] == "f16":
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(shape)
    scale = np.frombuffer(parts[".qscale"], "<f2").astype(np.float32)
    if t["dtype"] == "i8":
        q = np.frombuffer(raw, np.int8).reshape(shape).astype(np.float32)
        return q * scale[:, None]
    if t["dtype"] == "i4":
        q = unpack_i4(raw, *shape).astype(np.float32) - 8
        return q * scale[:, None]
    assert t["dtype"].startswith("q4g")
    block = int(t["dtype"][3:])
    n, k = shape
    nb = -(-k // block)
    q = unpack_i4(raw, n * nb, block).reshape(n, nb, block).astype(np.float32)
    zp = unpack_i4(parts[".qzero"], n, nb).astype(np.float32)
    s = scale.reshape(n, nb)
    return ((q - zp[..., None]) * s[..., None]).reshape(n, nb * block)[:, :k]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # odd column count in one tensor would need a non-Gemma shape; tiny_config has even dims. Add
    # an all-zero row and exact .5 ties so the rounding rules are exercised.
    cfg = tiny_config()
    w = random_weights(cfg, seed=3)
    g = w["model.layers.1.mlp.gate_proj.weight"]
    g[5, :] = 0.0
    g[7, :4] = [0.5, -0.5, 1.5, -2.5]
    g[7, 4] = 127.0 / 4  # scale = 0.25 for i8 -> exact ties at 0.125 multiples
    g[7, 5:9] = [0.125, -0.125, 0.375, -0.375]
    d = make_checkpoint(tmp_path_factory.mktemp("conv") / "tiny-gemma3", cfg, weights=w)
    (d / "NOTICE").write_text("Gemma is provided under and subject to the Gemma Terms of Use\n")
    return d, w, cfg


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    d, _, _ = ckpt
    out = tmp_path_factory.mktemp("out")
    return {p: convert(str(d), p, out_dir=out, threads=2) for p in PROFILES}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("profile", PROFILES)
def test_roundtrip_matches_reference(ckpt, converted, profile):
    _, weights, cfg = ckpt
    res = converted[profile]
    assert res.path.name == f"tiny-gemma3-{profile}.cellm"
    header, raw = read_cellm(res.path)
    names = [t["name"] for t in header["tensors"]]
    assert names == sorted(names)
    mains = [n for n in names if not n.endswith((".qscale", ".qzero"))]
    assert set(mains) == set(expected_tensors(cfg)) and "lm_head.weight" not in mains
    for name in mains:
        t, data = raw[name]
        w = weights[name]
        parts = {s: raw[name + s][1] for s in (".qscale", ".qzero") if name + s in raw}
        got = stored_dequant(t, data, parts)
        if t["dtype"] == "f16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32), err_msg=name)
        elif t["dtype"] in ("i8", "i4"):
            qmax = 127 if t["dtype"] == "i8" else 7
            q, s16 = ref_rowwise(w, qmax)
            np.testing.assert_array_equal(np.frombuffer(parts[".qscale"], "<f2"), s16, err_msg=name)
            if t["dtype"] == "i8":
                np.testing.assert_array_equal(np.frombuffer(data, np.int8).reshape(w.shape), q, err_msg=name)
            else:
                np.testing.assert_array_equal(unpack_i4(data, *w.shape).astype(np.int32) - 8, q, err_msg=name)
            np.testing.assert_array_equal(got, q * s16.astype(np.float32)[:, None], err_msg=name)
        else:
            deq, s16 = ref_q4g_asym(w, int(t["dtype"][3:]))
            np.testing.assert_array_equal(np.frombuffer(parts[".qscale"], "<f2").reshape(s16.shape), s16)
            np.testing.assert_array_equal(got, deq, err_msg=name)
    schemes = header["cellm_schemes"]
    assert all(raw[n][0]["dtype"] != "f16" for n in schemes)


def test_rounding_edge_cases_reached(ckpt, converted):
    """The all-zero row stores scale 1.0 and q = 0; the ties round away from zero."""
    header, raw = read_cellm(converted["int8-v1"].path)
    n = "model.layers.1.mlp.gate_proj.weight"
    q = np.frombuffer(raw[n][1], np.int8).reshape(160, 64)
    s = np.frombuffer(raw[n + ".qscale"][1], "<f2")
    assert s[5] == 1.0 and not q[5].any()
    assert s[7] == np.float16(0.25)
    assert list(q[7, :9]) == [2, -2, 6, -10, 127, 1, -1, 2, -2]  # 0.5/0.25=2 ... 0.125/0.25=0.5 -> 1


def test_header(ckpt, converted):
    d, _, cfg = ckpt
    res = converted["mixed-int4"]
    header, _ = read_cellm(res.path)
    assert header["rope_theta"] == 1e6  # GLOBAL base even for a transformers-5 style config
    assert header["model_type"].startswith("gemma3")
    for k, v in dict(vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
                     num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                     intermediate_size=cfg.intermediate_size).items():
        assert header[k] == v, k
    assert header["cellm_profile"]["name"] == "mixed-int4"
    assert header["cellm_extensions"] == ["q4g32", "u4"]
    assert "cellm_extensions" not in read_cellm(converted["int4-v1"].path)[0]  # pure v1 file
    assert header["cellm_schemes"]["model.layers.0.mlp.up_proj.weight"] == "q4g32"
    tok = (d / "tokenizer.json").read_bytes()
    assert header["cellm_tokenizer_sha256"] == hashlib.sha256(tok).hexdigest()
    assert header["cellm_source"]["checkpoint_sha256"]
    assert header["cellm_version"]
    assert "time" not in json.dumps(header).lower()


def test_result_and_sidecars(ckpt, converted):
    d, _, _ = ckpt
    res = converted["int4-v1"]
    assert res.sha256 == hashlib.sha256(res.path.read_bytes()).hexdigest()
    assert res.nbytes == res.path.stat().st_size
    assert res.tokenizer == res.path.with_name("tiny-gemma3-int4-v1.tokenizer.json")
    assert res.tokenizer.read_bytes() == (d / "tokenizer.json").read_bytes()
    assert res.notice.read_text().startswith("Gemma is provided")
    assert res.bytes_per_scheme.keys() == {"i4", "f16"}
    leftovers = [p.name for p in res.path.parent.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_deterministic_and_threads_independent(ckpt, tmp_path):
    d, _, _ = ckpt
    a = convert(str(d), "int4-v1", tmp_path / "a.cellm", threads=1)
    b = convert(str(d), "int4-v1", tmp_path / "b.cellm", threads=3)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256


def test_row_chunking_gives_identical_bytes(ckpt, tmp_path, monkeypatch):
    import cellm.convert as conv

    d, _, _ = ckpt
    whole = convert(str(d), "mixed-int4", tmp_path / "whole.cellm")
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)  # a few rows per work item
    chunked = convert(str(d), "mixed-int4", tmp_path / "chunked.cellm")
    assert whole.sha256 == chunked.sha256


class ExplodingSource:
    """A real checkpoint whose load() fails half-way through the tensors."""

    def __init__(self, inner, fail_after: int):
        self._inner, self._left = inner, fail_after

    def __getattr__(self, k):
        return getattr(self._inner, k)

    def load(self, name, rows=None):
        self._left -= 1
        if self._left < 0:
            raise OSError(f"injected read failure on {name}")
        return self._inner.load(name, rows=rows)


def test_atomic_on_failure(ckpt, tmp_path):
    from cellm.sources import open_source

    d, _, _ = ckpt
    src = ExplodingSource(open_source(str(d)), fail_after=20)
    with pytest.raises(OSError, match="injected"):
        convert(src, "int8-v1", tmp_path / "x.cellm")
    assert list(tmp_path.iterdir()) == []  # no .cellm, no sidecars, no temp files


def test_output_name_must_be_cellm(ckpt, tmp_path):
    with pytest.raises(CellmError, match=r"\.cellm"):
        convert(str(ckpt[0]), "f16", tmp_path / "x.bin")


KILL_CHILD = r"""
import sys, time
from cellm.convert import convert
from cellm.sources import open_source

class Slow:
    def __init__(self, inner):
        self._inner, self._n = inner, 0
    def __getattr__(self, k):
        return getattr(self._inner, k)
    def load(self, name, rows=None):
        self._n += 1
        if self._n == 15:
            print("ready", flush=True)
            time.sleep(60)
        return self._inner.load(name, rows=rows)

convert(Slow(open_source(sys.argv[1])), "int8-v1", sys.argv[2], threads=1)
"""


def test_sigkill_mid_convert_leaves_no_cellm(ckpt, tmp_path):
    import signal
    import subprocess
    import sys

    d, _, _ = ckpt
    out = tmp_path / "k.cellm"
    p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(d), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert not out.exists()
    assert not out.with_name("k.tokenizer.json").exists()
    left = [x.name for x in tmp_path.iterdir()]
    # only temp files (the .cellm's, and the sidecars' written alongside), all matching the names
    # the pipeline cleans up after a killed run
    from cellm.pipeline import TEMP_PATTERNS

    assert any(n.startswith(".k.cellm.") and n.endswith(".tmp") for n in left), left
    assert all(n.startswith(".k.") and ".tmp" in n and any(p.fullmatch(n) for p in TEMP_PATTERNS)
               for n in left), left


def test_output_mode_follows_umask(ckpt, tmp_path):
    import os
    import stat

    res = convert(str(ckpt[0]), "f16", tmp_path / "m.cellm")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o666 & ~umask


def test_tied_checkpoint_with_redundant_lm_head_writes_none(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, seed=1)
    w["lm_head.weight"] = w["model.embed_tokens.weight"].copy()  # some exports save the tie
    d = make_checkpoint(tmp_path / "tied", cfg, weights=w)
    res = convert(str(d), "int8-v1", tmp_path / "t.cellm")
    header, raw = read_cellm(res.path)
    assert "lm_head.weight" not in raw and "model.embed_tokens.weight" in raw


class NoSidecarSource:
    """A checkpoint without tokenizer.json and without a NOTICE."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, k):
        return getattr(self._inner, k)

    tokenizer_json = None
    notice = None


def test_source_without_notice_or_tokenizer(ckpt, tmp_path):
    from cellm.sources import open_source

    res = convert(NoSidecarSource(open_source(str(ckpt[0]))), "int4-v1", tmp_path / "n.cellm")
    assert res.path.is_file() and res.tokenizer is None and res.notice is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.cellm"]
    header, _ = read_cellm(res.path)
    assert header["cellm_tokenizer_sha256"] is None
