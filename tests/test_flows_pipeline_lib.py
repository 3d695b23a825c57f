"""Library side of the pipeline (cellm.pipeline, cellm.report) without Prefect."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from cellm import pipeline as pl
from cellm.report import run_report_markdown, run_report_table, size_quality_png


def test_keys_change_with_every_input():
    base = pl.build_key("src", "prof", "gate", "0.1.0")
    assert base == pl.build_key("src", "prof", "gate", "0.1.0")
    assert len({base, pl.build_key("src2", "prof", "gate", "0.1.0"), pl.build_key("src", "prof2", "gate", "0.1.0"),
                pl.build_key("src", "prof", "gate2", "0.1.0"), pl.build_key("src", "prof", "gate", "0.1.1")}) == 5


def test_gate_hash_is_the_thresholds_file_hash(tmp_path):
    from cellm.gates import GATES_FILE

    assert pl.gate_config_hash(None) == hashlib.sha256(Path(GATES_FILE).read_bytes()).hexdigest()
    f = tmp_path / "g.toml"
    f.write_text("[int4]\nmean_kl = { max = 1.0 }\n")
    assert pl.gate_config_hash(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(pl.PipelineError, match="does not exist"):
        pl.gate_config_hash(str(tmp_path / "missing.toml"))


def test_record_is_trusted_only_while_its_file_verifies(tmp_path):
    f = tmp_path / "a.cellm"
    f.write_bytes(b"x" * 100)
    pl.write_record(tmp_path, "convert", {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    assert pl.find_output(tmp_path) == f
    f.write_bytes(b"y" * 100)  # same size, different content
    assert pl.find_output(tmp_path) is None
    f.unlink()
    assert pl.load_record(tmp_path, "convert") is None
    (tmp_path / "convert.json").write_text("{not json")
    assert pl.load_record(tmp_path, "convert") is None


def test_clean_stale_temp_removes_only_leftovers(tmp_path):
    keep = [tmp_path / "m.cellm", tmp_path / "convert.json", tmp_path / "onnx" / "model.onnx", tmp_path / ".lock"]
    junk = [tmp_path / ".m.cellm.k2j3h4.tmp", tmp_path / ".m.tokenizer.json.tmp-123", tmp_path / "x.partial"]
    for p in keep + junk:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"1")
    (tmp_path / ".onnx.tmp-abc").mkdir()
    (tmp_path / ".onnx.tmp-abc" / "model.onnx").write_bytes(b"1")
    removed = {Path(p).name for p in pl.clean_stale_temp(tmp_path)}
    assert removed == {p.name for p in junk} | {".onnx.tmp-abc"}
    assert all(p.exists() for p in keep)


def _hold(d, seconds):
    with pl.key_lock(d):
        time.sleep(seconds)


def test_key_lock_serialises_and_is_freed_when_the_holder_is_killed(tmp_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_hold, args=(str(tmp_path), 60))
    p.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the child holds the lock
            try:
                with pl.key_lock(tmp_path, timeout=0.1):
                    pass
            except pl.PipelineError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("child never took the lock")
        os.kill(p.pid, 9)
        p.join(10)
        t0 = time.monotonic()
        with pl.key_lock(tmp_path, timeout=5):
            pass
        assert time.monotonic() - t0 < 5
    finally:
        if p.is_alive():
            p.kill()


def test_shard_plan_partitions_every_tensor(tiny_ckpt):
    from cellm.profile import load_profile
    from cellm.sources import open_source

    ck = open_source(str(tiny_ckpt))
    names = set(ck.tensor_names())
    for n in (1, 3, 7, 1000):
        groups = pl.shard_plan(str(tiny_ckpt), None, "int8-v1", n)
        flat = [x for g in groups for x in g]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
        assert len(groups) == min(n, len(names))
    assert load_profile("int8-v1")  # the profile the plan used exists


@pytest.mark.parametrize("bad", [dict(threads=0), dict(shards=-1), dict(registry="s3://x"), dict(source=" "),
                                 dict(task_runner="ray")])
def test_check_build_params_names_the_bad_value(bad):
    kw = dict(source="gemma-3-270m", registry="file://artifacts", threads=2, shards=0, task_runner="threads")
    kw.update(bad)
    with pytest.raises(pl.PipelineError) as ei:
        pl.check_build_params(**kw)
    (k, v), = bad.items()
    assert f"{k}={v!r}" in str(ei.value)


def _summary(status="blocked"):
    return {
        "source": "gemma-3-270m", "source_name": "gemma-3-270m", "source_hash": "ab" * 32, "profile": "int4-v1",
        "profile_hash": "cd" * 32, "gate_class": "int4", "key": "k1", "cellm_path": "/w/k1/x.cellm",
        "sha256": "ef" * 32, "nbytes": 3000, "bytes_per_scheme": {"f16": 1000, "i4": 2000},
        "tensors_per_scheme": {"f16": 3, "i4": 4}, "registry": "file://artifacts",
        "eval": {"mean_kl": 0.2, "top1_agreement": 0.9},
        "verdict": {"passed": status != "blocked", "gate_class": "int4", "checks": [
            {"metric": "mean_kl", "value": 0.2, "threshold": 0.05, "op": "<=", "passed": status != "blocked"},
            {"metric": "top1_agreement", "value": 0.9, "threshold": 0.88, "op": ">=", "passed": True}]},
        "status": status, "reason": "quality gate 'int4' failed: mean_kl" if status == "blocked" else None,
        "published": {"ref": "gemma-3-270m-int4-v1:0.1.0+k1"} if status == "published" else None,
        "timings": {"convert": 1.5}, "cached": {"convert": True},
    }


def test_report_markdown_and_table():
    md = run_report_markdown(_summary())
    assert "BLOCKED" in md and "| mean_kl | 0.2 | <= 0.05 | **FAIL** |" in md
    assert "| top1_agreement | 0.9 | >= 0.88 | pass |" in md
    assert "| i4 | 4 | 2000 (1.95 KiB) | 66.7% |" in md and "Not published: quality gate" in md
    md2 = run_report_markdown(_summary("published"))
    assert "Published to `file://artifacts` as `gemma-3-270m-int4-v1:0.1.0+k1`" in md2
    rows = run_report_table(_summary())
    assert all(k == k.lower() and "_" not in k and " " not in k for r in rows for k in r)
    assert {"kind": "gate", "name": "mean_kl", "value": 0.2, "threshold": "<= 0.05", "result": "fail"} in rows


def test_size_quality_png(tmp_path):
    runs = [dict(_summary(), profile="int8-v1", nbytes=5 << 20), dict(_summary("published"), nbytes=3 << 20),
            dict(_summary(), profile="mixed-int4", eval=None)]
    out = size_quality_png(runs, tmp_path / "p.png", source="s")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_collect_runs_keeps_latest_per_profile(tmp_path):
    pl.record_run(tmp_path, "src", "a", {"profile": "int8-v1", "time": 1, "n": 1})
    pl.record_run(tmp_path, "src", "b", {"profile": "int8-v1", "time": 2, "n": 2})
    pl.record_run(tmp_path, "src", "c", {"profile": "int4-v1", "time": 1, "n": 3})
    got = pl.collect_runs(tmp_path, "src")
    assert [(r["profile"], r["n"]) for r in got] == [("int4-v1", 3), ("int8-v1", 2)]
    assert json.loads((tmp_path / "src" / "runs" / "b.json").read_text())["n"] == 2


def test_export_step_reuses_only_the_same_settings(tiny_ckpt, tmp_path):
    from cellm.convert import convert

    art = str(convert(str(tiny_ckpt), "int4-g32", out=tmp_path / "m.cellm").path)
    d = tmp_path / "key"
    first = pl.export_step(art, d)
    assert not first["reused"] and first["accuracy_level"] == 4 and first["int8_residual"] is False
    assert pl.export_step(art, d)["reused"]
    l1 = pl.export_step(art, d, accuracy_level=1)  # another setting: exported again, not the level-4 files
    assert not l1["reused"] and l1["accuracy_level"] == 1
    cfg = json.loads((d / "onnx" / "cellm_config.json").read_text())["cellm_export"]
    assert cfg["accuracy_level"] == 1
    res = pl.export_step(art, d, int8_residual=True)
    assert not res["reused"] and res["int8_residual"] is True
    assert json.loads((d / "onnx" / "cellm_config.json").read_text())["cellm_export"]["int8_residual"] is True
    assert pl.export_step(art, d, int8_residual=True)["reused"]
