"""`cellm fetch SOURCE`."""

from __future__ import annotations

import hashlib
import json

import pytest

from cellm.cli import main


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cellm-cache"))


def test_fetch_local_dir_json(tiny_ckpt, capsys):
    assert main(["fetch", str(tiny_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(tiny_ckpt)
    assert info["config"]["hidden_size"] == json.loads((tiny_ckpt / "config.json").read_text())["hidden_size"]
    want = hashlib.sha256((tiny_ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert info["provenance"]["files"]["model.safetensors"] == want


def test_fetch_text_and_path_only(tiny_ckpt, capsys):
    assert main(["fetch", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert str(tiny_ckpt) in out and "checkpoint_sha256" in out
    assert main(["fetch", str(tiny_ckpt), "--path-only"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_ckpt)


def test_fetch_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert main(["fetch", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["fetch", "hf://acme/absent"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
