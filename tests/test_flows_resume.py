"""Resume after SIGKILL during conversion, and the Dask task runner's byte-identical output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from prefect.settings import PREFECT_API_URL  # noqa: E402

from flows_harness import prefect_harness  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def medium_ckpt(tmp_path_factory):
    """Big enough (~70 MB of f32) that conversion takes a while, small enough for CI."""
    from cellm.synthetic import make_checkpoint, tiny_config

    cfg = tiny_config(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    return make_checkpoint(tmp_path_factory.mktemp("medium") / "medium-gemma3", cfg, seed=1)


def _sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]


def test_sigkill_during_conversion_leaves_nothing_partial_and_rerun_completes(prefect_harness, medium_ckpt, tmp_path):
    work, reg = tmp_path / "work", tmp_path / "reg"
    script = textwrap.dedent(f"""
        from flows.build import build_int8
        build_int8(source={str(medium_ckpt)!r}, work_dir={str(work)!r}, registry={f'file://{reg}'!r},
                   export_onnx=False, evaluate=False, threads=1)
    """)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if work.exists() and any(".cellm." in p.name for p in _temps(work)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished (or died) before it could be killed during conversion"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stale = _temps(work)
    assert stale, "expected the killed conversion's temp file"
    # nothing that looks finished: no .cellm, no step record, nothing published
    assert not list(work.rglob("*.cellm")) and not list(work.rglob("convert.json"))
    assert not reg.exists() or not any(p.is_file() for p in reg.rglob("*"))

    from cellm.validate import validate
    from flows.build import build_int8

    st = build_int8(source=str(medium_ckpt), work_dir=str(work), registry=f"file://{reg}", export_onnx=False,
                    evaluate=False, threads=1, return_state=True)
    s = st.result()
    assert st.is_completed() and s["status"] == "built"
    assert not s["cached"]["convert"]
    assert _temps(work) == [], "stale temp files were not cleaned"
    assert validate(s["cellm_path"]).ok and _sha(s["cellm_path"]) == s["sha256"]
    # the same artifact as an uninterrupted conversion (independent, outside the pipeline)
    from cellm.convert import convert

    ref = convert(str(medium_ckpt), "int8-v1", out=tmp_path / "ref" / "ref.cellm", threads=1)
    assert ref.sha256 == s["sha256"]


def test_dask_local_cluster_is_byte_identical_to_default_runner(prefect_harness, tiny_ckpt, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.build import build_mixed_int4

    # window 24 over 128 tokens: 6 teacher-forced windows to split across the eval shards
    common = dict(source=str(tiny_ckpt), registry=f"file://{tmp_path / 'reg'}", publish=False,
                  eval_settings={"max_tokens": 128, "window": 24, "gen_tokens": 4})
    a = build_mixed_int4(**common, work_dir=str(tmp_path / "threads"), return_state=True)
    b = build_mixed_int4(**common, work_dir=str(tmp_path / "dask"), task_runner="dask", shards=3, return_state=True)
    sa, sb = a.result(), b.result()
    assert a.is_completed() and b.is_completed()
    assert Path(sa["cellm_path"]).read_bytes() == Path(sb["cellm_path"]).read_bytes()
    assert _sha(sb["cellm_path"]) == sa["sha256"]
    assert not list((tmp_path / "dask").rglob("*.npz")), "quantization and eval shards must be removed after merging"
    assert not list((tmp_path / "dask").rglob("*.plan.json"))
    # export ran on the cluster too (same ONNX bytes); evaluation ran sharded (eval_shards auto = 2 on
    # Dask) and its metrics equal the default runner's single-task evaluation exactly
    assert (Path(sa["onnx_dir"]) / "model.onnx").read_bytes() == (Path(sb["onnx_dir"]) / "model.onnx").read_bytes()
    assert sa["eval_shards"] == 0 and sb["eval_shards"] == 2
    assert len(sb["eval_shard_pids"]) == 2 and os.getpid() not in sb["eval_shard_pids"], "shards ran on Dask workers"
    assert sa["eval"] == sb["eval"] and sa["verdict"]["passed"] == sb["verdict"]["passed"]
    ja, jb = (json.loads(Path(s["eval_report"]).read_text()) for s in (sa, sb))
    assert ja["metrics"] == jb["metrics"] and ja["generations"] == jb["generations"]
    assert ja["settings"]["shards"] == 1 and jb["settings"]["shards"] == 2 and jb["settings"]["windows"] >= 4
    # the shard tasks are real task runs on the server, completed, in the check-artifact sub-flow
    with get_client(sync_client=True) as c:
        runs = [c.read_task_run(r) for r in sb["eval_shard_runs"]]
        sub = {c.read_flow_run(r.flow_run_id).name for r in runs}
        flows = {c.read_flow(c.read_flow_run(r.flow_run_id).flow_id).name for r in runs}
    assert sorted(r.name for r in runs) == ["eval-shard-0", "eval-shard-1"], [r.name for r in runs]
    assert all(r.state.is_completed() for r in runs) and len(sub) == 1 and flows == {"check-artifact"}

    # sharded evaluation with the threads runner too (eval_shards=3): same numbers; then an unchanged
    # rerun reuses the evaluation (no shard tasks)
    c3 = build_mixed_int4(**common, work_dir=str(tmp_path / "t3"), eval_shards=3, return_state=True).result()
    assert c3["eval_shards"] == 3 and c3["eval"] == sa["eval"] and c3["eval_shard_pids"] == [os.getpid()] * 3
    c4 = build_mixed_int4(**common, work_dir=str(tmp_path / "t3"), eval_shards=3, return_state=True).result()
    assert c4["cached"]["evaluate"] and c4["eval_shards"] == 0 and c4["eval"] == sa["eval"]
