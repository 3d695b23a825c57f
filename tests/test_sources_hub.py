"""``hf://`` sources resolved offline through the real ``huggingface_hub.snapshot_download``.

The tests lay out a real HF hub cache (``models--org--name/refs``, ``snapshots/<commit>``, ``blobs``)
under a temporary ``HF_HUB_CACHE`` and set ``HF_HUB_OFFLINE=1``: nothing touches the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellm.errors import SourceError, SourceNotFoundError
from cellm.sources import open_source
from cellm.sources.hub import parse_hf_spec
from cellm.synthetic import make_checkpoint, random_weights, tiny_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def _cache_repo(cache: Path, repo: str, commit: str, src: Path, ref: str | None = "main") -> Path:
    """Store ``src``'s files as a cached snapshot (blobs + symlinks, like huggingface_hub does)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cellm-cache"))
    return cache


def test_offline_snapshot_resolves_and_records_commit(hub, tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, seed=11)
    src = make_checkpoint(tmp_path / "src", cfg, weights=w, dtype="BF16")
    snap = _cache_repo(hub, "acme/tiny-gemma", COMMIT, src)
    ck = open_source("hf://acme/tiny-gemma")
    assert ck.path == snap
    assert ck.name == "tiny-gemma"
    assert ck.config == cfg
    prov = ck.provenance
    assert prov["repo"] == "acme/tiny-gemma"
    assert prov["commit"] == COMMIT
    assert prov["revision"] == "main"
    assert prov["spec"] == "hf://acme/tiny-gemma"
    assert prov["files"]["model.safetensors"] == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert np.abs(ck.load("model.norm.weight") - w["model.norm.weight"]).max() < 1e-2


def test_revision_by_commit_and_by_branch(hub, tmp_path):
    a = make_checkpoint(tmp_path / "a", seed=1)
    b = make_checkpoint(tmp_path / "b", seed=2)
    _cache_repo(hub, "acme/m", COMMIT, a)
    _cache_repo(hub, "acme/m", OTHER, b, ref="dev")
    assert open_source(f"hf://acme/m@{OTHER}").provenance["commit"] == OTHER
    ck = open_source("hf://acme/m", revision="dev")
    assert ck.provenance["commit"] == OTHER and ck.provenance["revision"] == "dev"
    assert open_source("hf://acme/m@main").provenance["commit"] == COMMIT
    assert open_source("hf://acme/m").content_hash != ck.content_hash


def test_missing_revision_is_not_found(hub, tmp_path):
    _cache_repo(hub, "acme/m", COMMIT, make_checkpoint(tmp_path / "a"))
    with pytest.raises(SourceNotFoundError, match="HF_HUB_OFFLINE"):
        open_source("hf://acme/m@" + "a" * 40)
    with pytest.raises(SourceNotFoundError, match=str(hub)):
        open_source("hf://acme/m@no-such-branch")


def test_uncached_repo_offline(hub):
    with pytest.raises(SourceNotFoundError, match=r"hf://acme/absent.*not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        open_source("hf://acme/absent")


def test_pickle_only_snapshot_refused(hub, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "gemma3_text"}')
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    _cache_repo(hub, "acme/pickled", COMMIT, src)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*only accepts safetensors"):
        open_source("hf://acme/pickled")


def test_snapshot_without_weights_refused(hub, tmp_path):
    src = tmp_path / "cfgonly"
    src.mkdir()
    shutil.copy(make_checkpoint(tmp_path / "x") / "config.json", src / "config.json")
    _cache_repo(hub, "acme/cfgonly", COMMIT, src)
    with pytest.raises(SourceError, match="safetensors"):
        open_source("hf://acme/cfgonly")


def test_parse_hf_spec():
    assert parse_hf_spec("hf://org/name") == ("org/name", None)
    assert parse_hf_spec("hf://org/name@v1") == ("org/name", "v1")
    assert parse_hf_spec("hf://org/name", "v2") == ("org/name", "v2")
    with pytest.raises(SourceError, match="pins revision"):
        parse_hf_spec("hf://org/name@v1", "v2")
    for bad in ("hf://", "hf://noslash", "hf://a/b/c", "hf://org/na me"):
        with pytest.raises(SourceError, match="hf://org/name"):
            parse_hf_spec(bad)
