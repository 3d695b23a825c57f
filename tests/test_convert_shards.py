"""Sharded conversion (pipeline.quantize_shard + assemble_shards) writes the same bytes as convert()."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cellm import pipeline as pl
from cellm.convert import convert
from cellm.profile import load_profile
from cellm.sources import open_source
from cellm.synthetic import make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("shards") / "ck", tiny_config(), seed=3)


@pytest.mark.parametrize("profile", ["int4-v1", "mixed-int4"])
def test_assembled_shards_equal_direct_conversion(src, tmp_path, profile):
    direct = convert(str(src), profile, tmp_path / "direct" / "d.cellm")
    ck = open_source(str(src))
    prof_hash = load_profile(profile).content_hash
    groups = pl.shard_plan(str(src), None, profile, 3)
    assert len(groups) == 3
    shard_files = [pl.quantize_shard(str(src), None, profile, g, tmp_path / "work", source_hash=ck.content_hash,
                                     index=i)["path"] for i, g in enumerate(groups)]
    rec = pl.assemble_shards(str(src), None, profile, shard_files, tmp_path / "work",
                             source_hash=ck.content_hash, profile_hash=prof_hash)
    out = Path(rec["path"])
    data = out.read_bytes()
    assert data == direct.path.read_bytes()
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() == direct.sha256
    assert rec["nbytes"] == len(data) and not rec["reused"]
    assert Path(rec["tokenizer"]).read_bytes() == direct.tokenizer.read_bytes()
    assert not any(Path(f).exists() for f in shard_files)  # the shards are dropped once assembled
    again = pl.assemble_shards(str(src), None, profile, [], tmp_path / "work",
                               source_hash=ck.content_hash, profile_hash=prof_hash)
    assert again["reused"] and again["sha256"] == rec["sha256"]


def test_missing_shard_tensor_leaves_nothing(src, tmp_path):
    ck = open_source(str(src))
    groups = pl.shard_plan(str(src), None, "int8-v1", 2)
    f0 = pl.quantize_shard(str(src), None, "int8-v1", groups[0], tmp_path / "work", source_hash=ck.content_hash,
                           index=0)["path"]
    with pytest.raises(pl.PipelineError, match="no shard holds tensor"):
        pl.assemble_shards(str(src), None, "int8-v1", [f0], tmp_path / "work", source_hash=ck.content_hash,
                           profile_hash=load_profile("int8-v1").content_hash)
    left = [p.name for p in (tmp_path / "work").rglob("*") if p.is_file() and p.suffix != ".npz" and p.name != ".lock"]
    assert left == [], left
