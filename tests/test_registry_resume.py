"""Interrupted pulls: a killed pull leaves no output directory; the next pull reuses verified staged
files, discards partial / wrong ones, and restarts cleanly when the target version changed."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from registry_server import PASSING, make_spec

from cellm.registry import open_registry, verify_dir

ORDER = ["model.NOTICE", "model.cellm", "model.tokenizer.json", "onnx/model.onnx", "onnx/model.onnx.data",
         "onnx/sub/genai_config.json"]  # fmt: skip


@pytest.fixture
def published(tmp_path):
    reg = open_registry(f"file://{tmp_path / 'reg'}")
    spec = make_spec(tmp_path / "src")
    reg.publish(spec, PASSING)
    return reg, spec


def test_killed_pull_resumes(published, tmp_path):
    reg, spec = published
    out = tmp_path / "out"
    # a real interruption: the pulling process SIGKILLs itself after its second file
    script = textwrap.dedent(
        f"""
        import os, signal
        from cellm.registry import open_registry
        n = []
        def progress(event, path, nbytes):
            n.append(path)
            if len(n) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        open_registry({reg.url!r}).pull("tiny-gemma:0.1.0", {str(out)!r}, progress=progress)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stage = tmp_path / ".out.partial"
    assert not out.exists()  # a reader never sees a partial bundle
    assert sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()) == [
        ".cellm-pull", *ORDER[:2]
    ]
    # simulate what an interruption mid-file leaves, plus a staged file with the wrong bytes
    (stage / "onnx").mkdir()
    (stage / "onnx/model.onnx.data.part").write_bytes(b"half a file")
    wrong = stage / "model.tokenizer.json"
    wrong.write_bytes(b"x" * spec.tokenizer_files[0].stat().st_size)  # right size, wrong bytes

    events = []
    res = reg.pull("tiny-gemma:0.1.0", out, progress=lambda e, p, n: events.append((e, p)))
    assert res.reused == tuple(ORDER[:2])  # verified staged files reused
    assert res.fetched == tuple(ORDER[2:])  # the rest (incl. the wrong one) fetched again
    assert events == [("reused", p) for p in ORDER[:2]] + [("fetched", p) for p in ORDER[2:]]
    assert verify_dir(out).version == "0.1.0"
    assert (out / "model.tokenizer.json").read_bytes() == spec.tokenizer_files[0].read_bytes()
    assert not stage.exists() and not list(out.rglob("*.part")) and not (out / ".cellm-pull").exists()


def test_keyboard_interrupt_then_resume(published, tmp_path):
    reg, _ = published
    out = tmp_path / "out"

    def stop_after_first(event, path, nbytes):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reg.pull("tiny-gemma", out, progress=stop_after_first)
    assert not out.exists() and (tmp_path / ".out.partial" / ORDER[0]).is_file()
    res = reg.pull("tiny-gemma", out)
    assert res.reused == (ORDER[0],) and len(res.fetched) == len(ORDER) - 1
    verify_dir(out)


def test_stale_stage_of_another_version_restarts_cleanly(published, tmp_path):
    reg, spec = published
    other = tmp_path / "v2.cellm"
    other.write_bytes(b"version two")
    reg.publish(dataclasses.replace(spec, version="0.2.0", cellm_file=other), PASSING)
    out = tmp_path / "out"

    def stop(event, path, nbytes):
        if path == ORDER[1]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reg.pull("tiny-gemma:0.1.0", out, progress=stop)
    res = reg.pull("tiny-gemma:0.2.0", out)  # different target: nothing from 0.1.0 is reused
    assert res.reused == ()
    assert (out / "v2.cellm").read_bytes() == b"version two" and not (out / "model.cellm").exists()
    assert verify_dir(out).version == "0.2.0"


def test_integrity_failure_after_interruption_leaves_nothing(published, tmp_path):
    reg, _ = published
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        reg.pull("tiny-gemma", out, progress=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    blob = reg.backend.root / "blobs/sha256" / reg.show("tiny-gemma").file("onnx/model.onnx").sha256
    os.chmod(blob, 0o644)
    blob.write_bytes(b"tampered")
    from cellm.errors import IntegrityError

    with pytest.raises(IntegrityError, match="onnx/model.onnx"):
        reg.pull("tiny-gemma", out)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
