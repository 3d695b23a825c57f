"""End to end: a real `prefect server` + process worker (infra/stack.sh), the deployments from
infra/prefect.yaml, `build-mixed-int4` triggered by deployment name on the real Gemma-3 270M.

The outcome is checked either way: published (then pulled back, sha256-verified by the registry and
validated) or blocked by a failed gate (then the report names the failing metric and nothing is in
the registry). Everything the stack started is stopped by PID in a finalizer, also on failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "infra" / "stack.sh"
# a shorter eval than the default keeps CI time reasonable; the reference statistics for these
# settings are cached under $CELLM_CACHE/eval after the first run
E2E_EVAL = {"max_tokens": 512, "gen_tokens": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.real
@pytest.mark.slow
def test_deployment_run_build_mixed_int4_on_real_270m(real_ckpt, tmp_path):
    state = tmp_path / "stack"
    port = _free_port()
    env = dict(os.environ, CELLM_STACK_DIR=str(state), CELLM_PREFECT_PORT=str(port),
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    pids: list[int] = []
    try:
        up = subprocess.run([str(STACK), "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        pids = [int((state / f"{n}.pid").read_text()) for n in ("server", "worker")]
        assert all(_alive(p) for p in pids)
        stack_env = dict(env, PREFECT_HOME=str(state / "prefect-home"),
                         PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
        work, reg = tmp_path / "work", tmp_path / "reg"
        params = {"work_dir": str(work), "registry": f"file://{reg}", "eval_settings": E2E_EVAL}
        t0 = time.perf_counter()
        run = subprocess.run(
            ["prefect", "deployment", "run", "build-mixed-int4/on-demand", "--params", json.dumps(params), "--watch",
             "--watch-timeout", "1500"],
            env=stack_env, capture_output=True, text=True, timeout=1600, cwd=tmp_path,
        )
        took = time.perf_counter() - t0
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        print(f"\ndeployment run took {took:.1f}s")

        # the flow run as the server recorded it
        import re

        m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert m, out[-2000:]
        flow_run_id = m.group(1)
        q = subprocess.run(
            ["python", "-c", f"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as c:
    fr = c.read_flow_run({flow_run_id!r})
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    print(json.dumps({{"type": fr.state.type.value, "name": fr.state.name, "message": fr.state.message,
                      "artifacts": [{{"type": a.type, "key": a.key, "data": a.data}} for a in arts]}}))
"""], env=stack_env, capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stderr[-2000:]
        fr = json.loads(q.stdout.strip().splitlines()[-1])
        assert fr["type"] == "COMPLETED", fr
        kinds = sorted(a["type"] for a in fr["artifacts"])
        assert kinds == ["markdown", "table"], kinds
        md = next(a["data"] for a in fr["artifacts"] if a["type"] == "markdown")

        runs = sorted((work / "gemma-3-270m" / "runs").glob("*.json"))
        assert len(runs) == 1
        s = json.loads(runs[0].read_text())
        assert s["profile"] == "mixed-int4-gemma3" and s["flow"] == "build-mixed-int4"
        assert Path(s["plot"]).read_bytes()[:4] == b"\x89PNG"
        assert (Path(s["onnx_dir"]) / "model.onnx").is_file()
        from cellm.validate import validate

        assert validate(s["cellm_path"]).ok
        if s["status"] == "published":
            assert fr["name"] == "Completed" and "PUBLISHED" in md
            from cellm.registry import open_registry

            pulled = open_registry(f"file://{reg}").pull(s["published"]["ref"], tmp_path / "pulled")
            files = list(Path(pulled.path).rglob("*.cellm"))
            assert len(files) == 1 and validate(files[0]).ok
        else:
            assert s["status"] == "blocked" and fr["name"] == "Blocked"
            failed = [c["metric"] for c in s["verdict"]["checks"] if not c["passed"]]
            assert failed and all(f in md and f in s["reason"] for f in failed)
            assert "Not published" in md
            assert not reg.exists() or not any(p.is_file() for p in reg.rglob("*"))
    finally:
        down = subprocess.run([str(STACK), "down"], env=env, capture_output=True, text=True, timeout=120)
        for p in pids:
            for _ in range(50):
                if not _alive(p):
                    break
                time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], down.stderr
