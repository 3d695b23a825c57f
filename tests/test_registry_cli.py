"""`cellm publish / pull / ls / show` against a file:// registry (in-process and as a real process)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from registry_server import FAILING, PASSING, make_bundle_files

from cellm.cli import main


@pytest.fixture
def env(tmp_path, monkeypatch):
    files = make_bundle_files(tmp_path / "build")
    url = f"file://{tmp_path / 'reg'}"
    monkeypatch.setenv("CELLM_REGISTRY", url)
    (tmp_path / "pass.json").write_text(json.dumps(PASSING))
    (tmp_path / "fail.json").write_text(json.dumps(FAILING))
    return tmp_path, files, url


def _publish(files, *extra):
    return main(["publish", *extra, "--cellm", str(files["cellm"]), "--onnx", str(files["onnx"])])


def test_publish_ls_show_pull(env, capsys):
    tmp, files, url = env
    assert _publish(files, "gemma-int8:1.0.0", "--verdict", str(tmp / "pass.json"), "--profile", "int8-v1",
                    "--channel", "latest", "--channel", "stable") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "published gemma-int8:1.0.0" in out and "latest, stable" in out
    assert main(["ls"]) == 0
    assert "gemma-int8  1 version(s), newest 1.0.0  [latest=1.0.0, stable=1.0.0]" in capsys.readouterr().out
    assert main(["ls", "gemma-int8"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("gemma-int8:1.0.0") and "passed" in line and "[latest, stable]" in line
    assert main(["show", "gemma-int8:1.0.0"]) == 0
    shown = capsys.readouterr().out
    assert "PASSED (class int8)" in shown and "kl_mean" in shown and "model.tokenizer.json" in shown
    assert "model.NOTICE" in shown and "onnx/sub/genai_config.json" in shown
    assert "channels:         latest, stable" in shown
    assert main(["show", "gemma-int8", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["profile"] == "int8-v1" and m["verdict"] == PASSING
    assert main(["pull", "gemma-int8@stable", "-o", str(tmp / "out")]) == 0
    assert "6 files" in (o := capsys.readouterr().out) and "every sha256 verified (6 fetched, 0 reused)" in o
    for f in m["files"]:
        assert hashlib.sha256((tmp / "out" / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert main(["ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["versions"] == ["1.0.0"]


def test_publish_refused_without_passing_verdict(env, capsys):
    tmp, files, url = env
    assert _publish(files, "gemma-int8:1.0.0", "--verdict", str(tmp / "fail.json")) == 2
    err = capsys.readouterr().err
    assert "refusing to publish gemma-int8:1.0.0" in err and "kl_mean" in err
    assert _publish(files, "gemma-int8:1.0.0") == 2  # no verdict at all
    assert "no gate verdict" in capsys.readouterr().err
    assert not (tmp / "reg" / "names").exists()
    assert _publish(files, "gemma-int8:1.0.0", "--force-unsafe", "--verdict", str(tmp / "fail.json")) == 2
    assert "requires a non-empty reason" in capsys.readouterr().err
    assert not (tmp / "reg" / "names").exists()


def test_force_unsafe_is_recorded_and_visible(env, capsys):
    tmp, files, url = env
    assert _publish(files, "gemma-int4:0.1.0", "--verdict", str(tmp / "fail.json"), "--force-unsafe",
                    "--reason", "ticket #42: demo only") == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "ticket #42: demo only" in captured.err
    assert main(["show", "gemma-int4:0.1.0"]) == 0
    shown = capsys.readouterr().out
    assert "FORCE-UNSAFE" in shown and "ticket #42: demo only" in shown and "NOT PASSED" in shown
    assert main(["ls", "gemma-int4"]) == 0
    assert "FORCED-UNSAFE" in capsys.readouterr().out
    assert main(["pull", "gemma-int4", "-o", str(tmp / "out")]) == 0
    assert "published with --force-unsafe: ticket #42" in capsys.readouterr().out
    manifest = json.loads((tmp / "out/manifest.json").read_text())
    assert manifest["force_unsafe"]["forced"] is True and manifest["force_unsafe"]["reason"] == "ticket #42: demo only"


def test_publish_from_eval_report(env, capsys):
    tmp, files, url = env
    report = {"metrics": {"kl_mean": 0.01, "top1": 0.99}, "verdict": PASSING}
    (tmp / "eval.json").write_text(json.dumps(report))
    assert _publish(files, "m:1.0.0", "--eval", str(tmp / "eval.json")) == 0
    capsys.readouterr()
    assert main(["show", "m:1.0.0", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["metrics"] == report["metrics"] and m["verdict"] == PASSING
    (tmp / "noverdict.json").write_text(json.dumps({"metrics": {"kl_mean": 0.01}}))
    assert _publish(files, "m:2.0.0", "--eval", str(tmp / "noverdict.json")) == 2
    assert "holds no gate verdict" in capsys.readouterr().err
    assert _publish(files, "m:2.0.0", "--verdict", str(tmp / "missing.json")) == 2
    assert _publish(files, "m", "--verdict", str(tmp / "pass.json")) == 2  # needs NAME:VERSION
    assert "NAME:VERSION" in capsys.readouterr().err


def test_pull_of_tampered_blob_exits_nonzero_as_a_process(env):
    tmp, files, url = env
    assert _publish(files, "gemma-int8:1.0.0", "--verdict", str(tmp / "pass.json")) == 0
    sha = hashlib.sha256(files["cellm"].read_bytes()).hexdigest()
    blob = tmp / "reg/blobs/sha256" / sha
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[0] ^= 0x80
    blob.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "cellm", "pull", "gemma-int8:1.0.0", "-o", str(tmp / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "CELLM_REGISTRY": url})
    assert proc.returncode == 2
    assert "model.cellm" in proc.stderr and sha in proc.stderr
    assert hashlib.sha256(bytes(data)).hexdigest() in proc.stderr
    assert not (tmp / "out").exists() and not Path(tmp / ".out.partial").exists()


def test_bad_refs_on_the_cli(env, capsys):
    tmp, files, url = env
    assert main(["pull", "../etc:1.0", "-o", str(tmp / "out")]) == 2
    assert "path separators" in capsys.readouterr().err
    assert main(["show", "nothing-here"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["ls", "nothing-here"]) == 2


def test_ls_shows_a_broken_version_without_hiding_the_others(env, capsys):
    tmp, files, url = env
    for v in ("1.0.0", "1.1.0"):
        assert _publish(files, f"g:{v}", "--verdict", str(tmp / "pass.json")) == 0
    bad = tmp / "reg/names/g/versions/1.0.0/manifest.json"
    os.chmod(bad, 0o644)
    bad.write_text("{broken")
    capsys.readouterr()
    assert main(["ls", "g"]) == 0
    out = capsys.readouterr().out
    assert "g:1.0.0  BROKEN:" in out and "not valid JSON" in out and "g:1.1.0" in out and "passed" in out
