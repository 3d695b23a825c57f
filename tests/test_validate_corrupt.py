"""validate: a good file passes; each corruption is reported naming the tensor (and offset);
no corrupted input makes validate raise."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from cellm.convert import convert
from cellm.validate import validate

PREFIX = 10


@pytest.fixture(scope="module")
def good(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("val")
    return {p: convert(str(tiny_ckpt), p, out_dir=out).path for p in ("int8-v1", "mixed-int4", "int4-v1")}


def load(path: Path):
    data = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<I", data[6:10])
    return data, json.loads(data[PREFIX : PREFIX + hlen]), hlen


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Apply ``edit(header, data)`` and rewrite the header in place (it must still fit before the
    first tensor: the container's padding leaves room)."""
    data, header, hlen = load(src)
    edit(header, data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    start = (PREFIX + hlen + 63) // 64 * 64
    assert PREFIX + len(blob) <= start, "edited header no longer fits"
    data[6:10] = struct.pack("<I", len(blob))
    data[PREFIX:start] = blob + bytes(start - PREFIX - len(blob))
    dst.write_bytes(bytes(data))
    return dst


def entry(header, name):
    return next(t for t in header["tensors"] if t["name"] == name)


def kinds(rep):
    return {(p.kind, p.tensor) for p in rep.problems}


@pytest.mark.parametrize("profile", ["int8-v1", "mixed-int4", "int4-v1"])
def test_good_file_passes_with_source(good, tiny_ckpt, profile):
    rep = validate(good[profile], source=str(tiny_ckpt))
    assert rep.ok, rep.problems
    assert rep.checked["numerics"] == rep.checked["semantics"] > 0


def test_truncated(good, tmp_path):
    data = good["int8-v1"].read_bytes()
    p = tmp_path / "t.cellm"
    p.write_bytes(data[: len(data) // 2])
    rep = validate(p)
    assert not rep.ok
    bad = [x for x in rep.problems if x.kind == "bounds"]
    assert bad and all(x.tensor and x.offset is not None for x in bad)
    assert "past EOF" in bad[0].message
    for n in (0, 5, 9, 11):
        p.write_bytes(data[:n])
        r = validate(p)
        assert not r.ok and r.problems[0].kind in ("truncated", "header", "magic")


def test_misaligned_offset(good, tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"

    def edit(h, d):
        entry(h, name)["offset_bytes"] += 8

    rep = validate(rewrite(good["int8-v1"], tmp_path / "m.cellm", edit))
    probs = [p for p in rep.problems if p.kind == "alignment"]
    assert [p.tensor for p in probs] == [name]
    assert probs[0].offset % 64 == 8


def test_overlapping_tensors(good, tmp_path):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight"

    def edit(h, d):
        entry(h, a)["offset_bytes"] = entry(h, b)["offset_bytes"]

    rep = validate(rewrite(good["int8-v1"], tmp_path / "o.cellm", edit))
    over = [p for p in rep.problems if p.kind == "overlap"]
    assert over and {over[0].tensor, *[w for w in (a, b) if w in over[0].message]} >= {a, b}


def test_wrong_nbytes(good, tmp_path):
    name = "model.layers.2.mlp.up_proj.weight.qscale"

    def edit(h, d):
        entry(h, name)["nbytes"] += 2

    rep = validate(rewrite(good["int8-v1"], tmp_path / "n.cellm", edit))
    assert ("nbytes", name) in kinds(rep)


def test_nan_scale(good, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight.qscale"

    def edit(h, d):
        off = entry(h, name)["offset_bytes"]
        d[off + 6 : off + 8] = struct.pack("<H", 0x7E00)  # f16 NaN in row 3

    rep = validate(rewrite(good["mixed-int4"], tmp_path / "s.cellm", edit))
    p = [x for x in rep.problems if x.kind == "scale"]
    assert p and p[0].tensor == name and p[0].offset is not None


def test_zero_scale(good, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight.qscale"

    def edit(h, d):
        off = entry(h, name)["offset_bytes"]
        d[off : off + 2] = b"\0\0"

    rep = validate(rewrite(good["int8-v1"], tmp_path / "z.cellm", edit))
    assert ("scale", name) in kinds(rep)


def test_nan_in_f16_weight(good, tmp_path):
    name = "model.embed_tokens.weight"

    def edit(h, d):
        off = entry(h, name)["offset_bytes"]
        d[off + 100 : off + 102] = struct.pack("<H", 0x7C00)  # +Inf

    rep = validate(rewrite(good["int8-v1"], tmp_path / "i.cellm", edit))
    p = [x for x in rep.problems if x.kind == "nonfinite"]
    assert p and p[0].tensor == name and "element 50" in p[0].message


def test_missing_tensor(good, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"

    def edit(h, d):
        h["tensors"] = [t for t in h["tensors"] if not t["name"].startswith(name)]

    rep = validate(rewrite(good["int8-v1"], tmp_path / "x.cellm", edit))
    assert ("missing", name) in kinds(rep)


def test_missing_companion(good, tmp_path):
    name = "model.layers.1.mlp.gate_proj.weight"

    def edit(h, d):
        h["tensors"] = [t for t in h["tensors"] if t["name"] != name + ".qscale"]

    rep = validate(rewrite(good["int4-v1"], tmp_path / "c.cellm", edit))
    assert ("companion", name) in kinds(rep)


def test_duplicate_name(good, tmp_path):
    a = "model.layers.0.post_attention_layernorm.weight"

    def edit(h, d):
        entry(h, "model.layers.0.pre_feedforward_layernorm.weight")["name"] = a

    rep = validate(rewrite(good["int8-v1"], tmp_path / "d.cellm", edit))
    assert ("duplicate", a) in kinds(rep)
    assert ("missing", "model.layers.0.pre_feedforward_layernorm.weight") in kinds(rep)


def test_unknown_dtype(good, tmp_path):
    name = "model.norm.weight"

    def edit(h, d):
        entry(h, name)["dtype"] = "f17"

    rep = validate(rewrite(good["int8-v1"], tmp_path / "u.cellm", edit))
    p = [x for x in rep.problems if x.kind == "dtype"]
    assert p and p[0].tensor == name and "f17" in p[0].message


def test_unsorted(good, tmp_path):
    def edit(h, d):
        h["tensors"][0], h["tensors"][1] = h["tensors"][1], h["tensors"][0]

    rep = validate(rewrite(good["int8-v1"], tmp_path / "s.cellm", edit))
    assert any(p.kind == "order" for p in rep.problems)


def test_wrong_extensions_and_shape(good, tmp_path):
    def edit(h, d):
        h["cellm_extensions"] = []
        h["hidden_dim"] = 65

    rep = validate(rewrite(good["mixed-int4"], tmp_path / "e.cellm", edit))
    ks = {p.kind for p in rep.problems}
    assert {"extensions", "config"} <= ks


@pytest.mark.parametrize(
    "mutate, kind",
    [
        (lambda d: d.__setitem__(slice(0, 5), b"CELLX"), "magic"),
        (lambda d: d.__setitem__(5, 2), "version"),
        (lambda d: d.__setitem__(slice(6, 10), struct.pack("<I", 0xFFFFFFF0)), "header"),
        (lambda d: d.__setitem__(slice(10, 11), b"["), "header"),
    ],
)
def test_bad_prefix(good, tmp_path, mutate, kind):
    d = bytearray(good["int8-v1"].read_bytes())
    mutate(d)
    p = tmp_path / "p.cellm"
    p.write_bytes(bytes(d))
    rep = validate(p)
    assert not rep.ok and rep.problems[0].kind == kind


def test_tampered_weight_caught_by_source_numerics(good, tiny_ckpt, tmp_path):
    name = "model.layers.2.mlp.down_proj.weight"

    def edit(h, d):
        off = entry(h, name)["offset_bytes"]
        d[off + 40] ^= 0x77  # i8: one weight far off its value

    p = rewrite(good["int8-v1"], tmp_path / "w.cellm", edit)
    assert validate(p).ok  # structurally and semantically still fine
    rep = validate(p, source=str(tiny_ckpt))
    num = [x for x in rep.problems if x.kind == "numerics"]
    assert [x.tensor for x in num] == [name] and "row 0" in num[0].message


def test_random_corruption_never_raises(good, tmp_path):
    rnd = random.Random(1234)
    base = good["mixed-int4"].read_bytes()
    _, _, hlen = load(good["mixed-int4"])
    p = tmp_path / "r.cellm"
    for i in range(150):
        d = bytearray(base)
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randrange(0, PREFIX + hlen + 64) if i % 2 else rnd.randrange(len(d))
            d[pos] = rnd.randrange(256)
        if i % 7 == 0:
            d = d[: rnd.randrange(len(d))]
        p.write_bytes(bytes(d))
        rep = validate(p)  # must not raise
        assert rep.ok == (not rep.problems)
        assert not [x for x in rep.problems if x.kind == "internal"], rep.problems


def test_missing_file(tmp_path):
    rep = validate(tmp_path / "nope.cellm")
    assert not rep.ok and rep.problems[0].kind == "io"


@pytest.mark.parametrize("profile", ["int8-v1", "mixed-int4"])
def test_file_without_cellm_keys_validates_by_dtype(good, tiny_ckpt, tmp_path, profile):
    """An upstream-style file (no cellm_* keys) is checked with the dtype's own RTN scheme."""

    def edit(h, d):
        for k in [k for k in h if k.startswith("cellm_") and k != "cellm_extensions"]:
            del h[k]

    rep = validate(rewrite(good[profile], tmp_path / "up.cellm", edit), source=str(tiny_ckpt))
    assert rep.ok, rep.problems


def test_every_scheme_validates_with_source(tiny_ckpt, tmp_path):
    """A profile using every registered RTN scheme converts and validates against the source."""
    prof = tmp_path / "all.toml"
    prof.write_text(
        'name = "all"\ngate_class = "int4"\n'
        "[[rules]]\npattern = '.*\\.q_proj\\.weight'\nscheme = \"q4g32-sym\"\n"
        "[[rules]]\npattern = '.*\\.k_proj\\.weight'\nscheme = \"q4g64\"\n"
        "[[rules]]\npattern = '.*\\.v_proj\\.weight'\nscheme = \"q4g128-sym\"\n"
        "[[rules]]\npattern = '.*\\.o_proj\\.weight'\nscheme = \"q4g128\"\n"
        "[[rules]]\npattern = '.*\\.gate_proj\\.weight'\nscheme = \"q4g64-sym\"\n"
        "[[rules]]\npattern = '.*\\.up_proj\\.weight'\nscheme = \"i8\"\n"
        "[[rules]]\npattern = '.*\\.down_proj\\.weight'\nscheme = \"i4\"\n"
        "[[rules]]\npattern = '.*'\nscheme = \"f16\"\n"
    )
    res = convert(str(tiny_ckpt), str(prof), tmp_path / "all.cellm")
    rep = validate(res.path, source=str(tiny_ckpt))
    assert rep.ok, rep.problems


@pytest.mark.parametrize("extra", [
    ("model.layers.0.mlp.extra_proj.weight", "f16", (4,), None),  # not a Gemma-3 tensor
    ("model.layers.99.input_layernorm.weight", "f16", (4,), None),  # a layer the config lacks
    ("lm_head.weight", "f16", (4,), None),  # tied config: no separate LM head
    ("model.norm.bias.qscale", "f16", (4,), "model.norm.bias"),  # companion of a non-Gemma tensor
])
def test_extra_tensor_is_an_error_naming_it_and_its_offset(good, tmp_path, extra):
    from cellm.format import CellmReader
    from cellm.format.writer import write_cellm

    name, dtype, shape, main = extra
    with CellmReader(good["int4-v1"]) as r:
        header = dict(r.header)
        arrays = {t["name"]: (t["dtype"], tuple(t["shape"]), np.array(r.raw(t["name"])))
                  for t in header["tensors"]}
    arrays[name] = (dtype, shape, np.ones(shape, np.float16))
    out = write_cellm(tmp_path / "extra.cellm", header, arrays)
    rep = validate(out)
    assert not rep.ok
    probs = [p for p in rep.problems if p.kind == "extra"]
    assert [p.tensor for p in probs] == [name], rep.problems
    with CellmReader(out) as r:
        off = r.info(name).offset
    assert probs[0].offset == off and f"offset {off}" in str(probs[0])
    if main is not None:
        assert f"companion of {main}" in probs[0].message
    # nothing else is wrong with the file
    assert {p.kind for p in rep.problems} == {"extra"} | ({"companion"} if main else set()), rep.problems
