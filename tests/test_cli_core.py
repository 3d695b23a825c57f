"""CLI: convert / inspect / validate / explain through cellm.cli.main and the console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from cellm.cli import main
from cellm.names import expected_tensors
from cellm.synthetic import tiny_config


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    rc = main(["convert", str(tiny_ckpt), "--profile", "int8-v1", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    return out / "tiny-gemma3-int8-v1.cellm"


def test_convert_default_name_and_sidecars(converted, capsys):
    assert converted.is_file()
    assert converted.with_name("tiny-gemma3-int8-v1.tokenizer.json").is_file()


def test_convert_json_output(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "x.cellm"
    assert main(["convert", str(tiny_ckpt), "-p", "int4-v1", "-o", str(out), "--no-progress", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["path"] == str(out) and d["profile"] == "int4-v1" and len(d["sha256"]) == 64
    assert set(d["bytes_per_scheme"]) == {"f16", "i4"}


def test_convert_with_progress_bar(tiny_ckpt, tmp_path, capsys):
    assert main(["convert", str(tiny_ckpt), "-p", "f16", "-o", str(tmp_path / "y.cellm")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_convert_unknown_profile_exit_2(tiny_ckpt, tmp_path, capsys):
    assert main(["convert", str(tiny_ckpt), "-p", "int3", "-o", str(tmp_path / "z.cellm")]) == 2
    assert "unknown profile 'int3'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_inspect(converted, capsys):
    assert main(["inspect", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.weight.qscale" in out and "rope_theta" in out
    assert main(["inspect", str(converted), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    names = {t["name"] for t in d["tensors"]}
    assert set(expected_tensors(tiny_config())) <= names
    assert d["bytes_per_dtype"]["i8"] > 0 and d["extensions"] == []
    assert d["header"]["rope_theta"] == 1e6


def test_validate_ok_and_json(converted, tiny_ckpt, capsys):
    assert main(["validate", str(converted), "--source", str(tiny_ckpt)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(converted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_validate_failure_exit_1_names_tensor_and_offset(converted, tmp_path, capsys):
    bad = tmp_path / "bad.cellm"
    data = converted.read_bytes()
    bad.write_bytes(data[: len(data) - 100])
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "tensor model." in out and "@ offset" in out and "INVALID" in out


def test_validate_bad_source_exit_2(converted, tmp_path, capsys):
    assert main(["validate", str(converted), "--source", str(tmp_path / "nope")]) == 2
    assert "cellm: error:" in capsys.readouterr().err


def test_inspect_corrupt_exit_2(tmp_path, capsys):
    p = tmp_path / "junk.cellm"
    p.write_bytes(b"CELLX" + bytes(20))
    assert main(["inspect", str(p)]) == 2
    assert "cellm: error:" in capsys.readouterr().err


def test_explain(tiny_ckpt, capsys):
    assert main(["explain", str(tiny_ckpt), "--profile", "mixed-int4-v1"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.2.mlp.up_proj.weight" in out and "total i4" in out and "total f16" in out
    assert main(["explain", str(tiny_ckpt), "-p", "int4-v1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_bytes"] == sum(d["bytes_per_scheme"].values())
    rows = {t["name"]: t for t in d["tensors"]}
    assert rows["model.embed_tokens.weight"]["scheme"] == "i4"
    assert rows["model.layers.0.self_attn.q_norm.weight"]["scheme"] == "f16"


def test_help_lists_profiles(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for p in ("int8-v1", "int4-v1", "mixed-int4-v1", "mixed-int4"):
        assert p in out
    assert "default: 2" in out  # --threads default shown


def test_console_script(converted):
    exe = shutil.which("cellm")
    cmd = [exe] if exe else [sys.executable, "-m", "cellm"]
    r = subprocess.run(cmd + ["validate", str(converted)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
