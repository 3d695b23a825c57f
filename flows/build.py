"""The build pipeline as Prefect flows: fetch → plan → convert → validate → export ONNX → evaluate →
gate → publish, plus run reports.

Three flows share one pipeline and differ only in their default profile:

* ``build-int8``        → profile ``int8-v1``
* ``build-int4``        → profile ``int4-v1``
* ``build-mixed-int4``  → profile ``mixed-int4-gemma3`` (the measured allocation of ``cellm quality``:
  6-bit embedding, i8 down_proj, 6-bit symmetric elsewhere; one rule per family, any Gemma-3 size)

Every task calls one ``cellm`` library function (mostly :mod:`cellm.pipeline` steps) and passes file
paths and content hashes, never arrays. Outputs are content-addressed under ``work_dir`` and task
results are cached by the same content keys (source hash, profile hash, gate thresholds hash, package
version), so an unchanged rebuild does no conversion or evaluation work.

A build whose quality gate fails ends **Completed** in a state named ``Blocked`` (it is a correct
outcome of the pipeline, not a crash): nothing is published and the report says which metric broke
which threshold. Bad input (unknown profile, unreachable source, bad parameters) ends **Failed** with
the library's message in the flow-run logs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from cellm import pipeline as pl

DEFAULT_SOURCE = "gemma-3-270m"
DEFAULT_REGISTRY = "file://artifacts"
DEFAULT_WORK_DIR = os.environ.get("CELLM_WORK_DIR", "work")
PROFILES = {"build-int8": "int8-v1", "build-int4": "int4-v1", "build-mixed-int4": "mixed-int4-gemma3"}
REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ helpers

def _transient(task_, task_run, state) -> bool:
    """Retry the fetch only on transient I/O trouble (network, timeouts), not on definite answers
    from the library (unknown source, bad checkpoint): those fail fast."""
    from cellm.errors import CellmError

    try:
        state.result()
    except CellmError:
        return False
    except (ConnectionError, TimeoutError, OSError):
        return True
    except Exception:
        return False
    return False


def _record_key(step: str, dir_param: str = "key_dir"):
    """cache_key_fn: the content key, but only while the step's verified record exists on disk (a
    deleted work dir makes Prefect recompute instead of returning paths to missing files)."""

    def key_fn(ctx, params: dict) -> str | None:
        d = params.get(dir_param)
        if not d or pl.load_record(d, step) is None:
            return None
        return pl.step_key("prefect", step, params.get("key"), str(Path(d).resolve()))

    return key_fn


def _convert_cache_key(ctx, params: dict) -> str | None:
    key = pl.convert_key(params["source_hash"], params["profile_hash"])
    d = pl.key_dir(params["work_dir"], params["source_name"], key)
    if pl.load_record(d, "convert") is None:
        return None
    return pl.step_key("prefect", "convert", key, str(d.resolve()))


# ------------------------------------------------------------------------------------------- tasks

@task(name="check-inputs", cache_policy=NO_CACHE)
def check_inputs_task(source: str, profile: str, gate: str | None, registry: str, threads: int, shards: int,
                 task_runner: str) -> dict[str, Any]:
    return pl.check_inputs(source=source, profile=profile, gate=gate, registry=registry, threads=threads,
                           shards=shards, task_runner=task_runner)


@task(name="fetch", retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient,
      cache_policy=NO_CACHE)
def fetch_task(source: str, revision: str | None) -> dict[str, Any]:
    return pl.fetch_source(source, revision)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(source: str, revision: str | None, profile: str, source_hash: str) -> dict[str, Any]:
    return pl.plan_summary(source, revision, profile, source_hash)


@task(name="convert", cache_key_fn=_convert_cache_key, persist_result=True)
def convert_task(source: str, revision: str | None, profile: str, work_dir: str, source_name: str,
            source_hash: str, profile_hash: str, threads: int = 2) -> dict[str, Any]:
    return pl.convert_step(source, revision, profile, work_dir, source_hash=source_hash,
                           profile_hash=profile_hash, threads=threads)


@task(name="shard-plan", cache_policy=NO_CACHE)
def shard_plan_task(source: str, revision: str | None, profile: str, shards: int, source_hash: str) -> list:
    return pl.shard_plan(source, revision, profile, shards, source_hash)


@task(name="quantize-shard", cache_policy=NO_CACHE, task_run_name="quantize-shard-{index}")
def quantize_shard_task(source: str, revision: str | None, profile: str, names: list, key_dir: str,
                        source_hash: str, index: int) -> dict[str, Any]:
    return pl.quantize_shard(source, revision, profile, names, key_dir, source_hash=source_hash, index=index)


@task(name="assemble-shards", cache_key_fn=_convert_cache_key, persist_result=True)
def assemble_task(source: str, revision: str | None, profile: str, shard_files: list, work_dir: str,
                  source_name: str, source_hash: str, profile_hash: str) -> dict[str, Any]:
    return pl.assemble_shards(source, revision, profile, shard_files, work_dir, source_hash=source_hash,
                              profile_hash=profile_hash)


@flow(name="convert-shards", log_prints=True)
def convert_shards(source: str, revision: str | None, profile: str, work_dir: str, source_name: str,
                   source_hash: str, profile_hash: str, shards: int) -> dict[str, Any]:
    """Per-tensor-group quantization fanned out on the flow's task runner (threads or Dask), then one
    assembly into the content-addressed key directory. Byte-identical to the direct conversion."""
    key = pl.convert_key(source_hash, profile_hash)
    d = pl.key_dir(work_dir, source_name, key)
    if pl.load_record(d, "convert") is not None:  # finished before: no quantization work
        return {**pl.load_record(d, "convert"), "reused": True}
    groups = shard_plan_task(source, revision, profile, shards, source_hash)
    futs = [quantize_shard_task.submit(source, revision, profile, g, str(d), source_hash, i)
            for i, g in enumerate(groups)]
    files = [f.result()["path"] for f in futs]
    return assemble_task(source, revision, profile, files, work_dir, source_name, source_hash, profile_hash)


def _evaluate_sharded(cellm_path, key_dir, source, revision, source_hash, cellm_sha256, eval_settings, threads,
                      eval_shards) -> tuple[dict, bool]:
    """eval-plan → ``eval_shards`` eval-shard tasks (on the runner's workers) → eval-merge."""
    plan = eval_plan_task.submit(cellm_path, source, revision, key_dir, source_hash, cellm_sha256, eval_settings,
                                 eval_shards, threads).result()
    if plan.get("reused"):  # this artifact was evaluated with these settings before: no work
        return {**plan, "eval_shards": 0, "eval_shard_runs": [], "eval_shard_pids": []}, True
    futs = [eval_shard_task.submit(plan["plan"], cellm_path, i, threads) for i in range(plan["shards"])]
    shard_res = [f.result() for f in futs]
    files = [r["path"] for r in shard_res]
    fut = eval_merge_task.submit(plan["plan"], files, source, revision, key_dir, source_hash, cellm_sha256,
                                 eval_settings)
    fut.wait()
    res = fut.state.result()
    return ({**res, "eval_shards": len(futs), "eval_shard_runs": [str(f.task_run_id) for f in futs],
             "eval_shard_pids": [r["pid"] for r in shard_res]},
            fut.state.name == "Cached" or bool(res.get("reused")))


def _export_and_evaluate(cellm_path, key_dir, key, source, revision, source_hash, cellm_sha256, eval_settings,
                         threads, export_onnx, evaluate, eval_shards=1) -> dict[str, tuple[dict, bool, float]]:
    t0 = time.perf_counter()
    futs = {}
    out = {}
    if export_onnx:
        futs["export-onnx"] = export_onnx_task.submit(cellm_path, key_dir, key)
    if evaluate and eval_shards <= 1:
        futs["evaluate"] = evaluate_task.submit(cellm_path, source, revision, key_dir, source_hash, cellm_sha256,
                                                eval_settings, threads)
    elif evaluate:  # runs while export-onnx is in flight
        res, was_cached = _evaluate_sharded(cellm_path, key_dir, source, revision, source_hash, cellm_sha256,
                                            eval_settings, threads, eval_shards)
        out["evaluate"] = (res, was_cached, round(time.perf_counter() - t0, 3))
    for name, fut in futs.items():
        fut.wait()
        st = fut.state
        res = st.result()  # raises the task's exception
        out[name] = (res, st.name == "Cached" or bool(res.get("reused")), round(time.perf_counter() - t0, 3))
    return out


@flow(name="check-artifact", log_prints=True)
def check_artifact(cellm_path: str, key_dir: str, key: str, source: str, revision: str | None, source_hash: str,
                   cellm_sha256: str, eval_settings: dict, threads: int, export_onnx: bool, evaluate: bool,
                   eval_shards: int = 1) -> dict:
    """ONNX export and (sharded) evaluation of one artifact as concurrent tasks on this sub-flow's runner."""
    return _export_and_evaluate(cellm_path, key_dir, key, source, revision, source_hash, cellm_sha256,
                                eval_settings, threads, export_onnx, evaluate, eval_shards)


def make_task_runner(spec: str):
    """``threads`` → Prefect's ThreadPoolTaskRunner; ``dask`` → a local 2-process Dask cluster;
    ``tcp://HOST:PORT`` (or ``dask://HOST:PORT``) → an existing Dask scheduler."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if spec == "threads":
        return ThreadPoolTaskRunner(max_workers=4)
    from prefect_dask import DaskTaskRunner

    if spec == "dask":
        # Local worker processes must import this module by name and report task runs to the same
        # Prefect API as this flow (in ephemeral/test mode that URL exists only in this process).
        from prefect.client.orchestration import get_client

        pp = os.environ.get("PYTHONPATH", "")
        env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + ([pp] if pp else [])),
               "PREFECT_API_URL": str(get_client().api_url).rstrip("/"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "env": env})
    return DaskTaskRunner(address="tcp://" + spec.split("://", 1)[1] if spec.startswith("dask://") else spec)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cellm_path: str, source: str, revision: str | None, source_hash: str) -> dict[str, Any]:
    return pl.validate_step(cellm_path, source, revision, source_hash)


@task(name="export-onnx", cache_key_fn=_record_key("onnx"), persist_result=True)
def export_onnx_task(cellm_path: str, key_dir: str, key: str) -> dict[str, Any]:
    return pl.export_step(cellm_path, key_dir)


def _eval_cache_key(ctx, params: dict) -> str | None:
    k = pl.eval_key(params["cellm_sha256"], params["source_hash"], params.get("settings") or {})
    if pl.load_record(params["key_dir"], f"eval-{k}", verify=("report",)) is None:
        return None
    return pl.step_key("prefect", "eval", k, str(Path(params["key_dir"]).resolve()))


@task(name="evaluate", cache_key_fn=_eval_cache_key, persist_result=True)
def evaluate_task(cellm_path: str, source: str, revision: str | None, key_dir: str, source_hash: str,
             cellm_sha256: str, settings: dict | None = None, threads: int | None = None) -> dict[str, Any]:
    return pl.evaluate_step(cellm_path, source, revision, key_dir, source_hash=source_hash,
                            cellm_sha256=cellm_sha256, settings=settings, threads=threads)


@task(name="eval-plan", cache_policy=NO_CACHE)
def eval_plan_task(cellm_path: str, source: str, revision: str | None, key_dir: str, source_hash: str,
                   cellm_sha256: str, settings: dict | None, shards: int, threads: int | None = None) -> dict[str, Any]:
    return pl.eval_plan_step(cellm_path, source, revision, key_dir, source_hash=source_hash,
                             cellm_sha256=cellm_sha256, settings=settings, shards=shards, threads=threads)


@task(name="eval-shard", cache_policy=NO_CACHE, task_run_name="eval-shard-{index}")
def eval_shard_task(plan_path: str, cellm_path: str, index: int, threads: int | None = None) -> dict[str, Any]:
    return pl.eval_shard_step(plan_path, cellm_path, index, threads=threads)


@task(name="eval-merge", cache_key_fn=_eval_cache_key, persist_result=True)
def eval_merge_task(plan_path: str, shard_files: list, source: str, revision: str | None, key_dir: str,
                    source_hash: str, cellm_sha256: str, settings: dict | None = None) -> dict[str, Any]:
    return pl.eval_merge_step(plan_path, shard_files, source, revision, key_dir, source_hash=source_hash,
                              cellm_sha256=cellm_sha256, settings=settings)


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(eval_report: str, gate_class: str, gates_file: str | None) -> dict[str, Any]:
    return pl.gate_step(eval_report, gate_class, gates_file)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(registry: str, cellm_path: str, source_name: str, profile: str, build_key: str, verdict: dict,
            metrics: dict, onnx_dir: str | None, profile_hash: str, gate_hash: str) -> dict[str, Any]:
    return pl.publish_step(registry, cellm_path, source_name=source_name, profile=profile,
                           build_key=build_key, verdict=verdict, metrics=metrics, onnx_dir=onnx_dir,
                           profile_hash=profile_hash, gate_hash=gate_hash)


@task(name="report", cache_policy=NO_CACHE)
def report_task(summary: dict, work_dir: str) -> dict[str, Any]:
    from cellm.report import write_run_report

    from flows.report import create_run_artifacts

    s = write_run_report(summary, work_dir)
    s["artifacts"] = create_run_artifacts(s)
    return s


# -------------------------------------------------------------------------------------------- flows

def run_build(flow_name: str, *, source: str, revision: str | None, profile: str | None,
              gate: str | None, registry: str, export_onnx: bool, evaluate: bool, publish: bool,
              task_runner: str, shards: int, threads: int, work_dir: str,
              eval_settings: dict | None = None, eval_shards: int = 0):
    """The one pipeline behind the three flows (called from inside a flow run)."""
    log = get_run_logger()
    profile = profile or PROFILES[flow_name]
    work_dir = str(Path(work_dir).resolve())
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}

    def step(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        st = fn(*args, return_state=True, **kwargs)
        res = st.result()  # raises the task's exception (the flow run fails with its message)
        timings[name] = round(time.perf_counter() - t0, 3)
        cached[name] = st.name == "Cached" or bool(isinstance(res, dict) and res.get("reused"))
        return res

    from cellm.eval.shards import check_shard_count

    check_shard_count(eval_shards, allow_auto=True)  # bad parameter: fail before any work
    eval_shards = eval_shards or (1 if task_runner == "threads" else 2)
    inputs = step("check-inputs", check_inputs_task, source, profile, gate, registry, threads, shards, task_runner)
    src = step("fetch", fetch_task, source, revision)
    log.info("source %s → %s (content %s)", source, src["path"], src["content_hash"][:16])
    pln = step("plan", plan_task, source, revision, profile, src["content_hash"])
    log.info("profile %s (gate class %s): %s", pln["profile"], pln["gate_class"], pln["bytes_per_scheme"])
    if shards == 0:
        shards = 1 if task_runner == "threads" else 4
    if shards == 1:
        conv = step("convert", convert_task, source, revision, profile, work_dir, src["name"], src["content_hash"],
                    pln["profile_hash"], threads)
    else:
        t0 = time.perf_counter()
        sub = convert_shards.with_options(task_runner=make_task_runner(task_runner))
        conv = sub(source, revision, profile, work_dir, src["name"], src["content_hash"], pln["profile_hash"], shards)
        timings["convert"] = round(time.perf_counter() - t0, 3)
        cached["convert"] = bool(conv.get("reused"))
        log.info("converted in %d shards on task runner %s", shards, task_runner)
    log.info("artifact %s (%d bytes, sha256 %s, reused=%s)", conv["path"], conv["nbytes"], conv["sha256"],
             cached["convert"])
    step("validate", validate_task, conv["path"], source, revision, src["content_hash"])

    key_dir = str(Path(conv["path"]).parent)
    summary: dict[str, Any] = {
        "flow": flow_name, "source": source, "revision": revision, "source_name": src["name"],
        "source_hash": src["content_hash"], "commit": src.get("commit"), "profile": pln["profile"],
        "profile_hash": pln["profile_hash"], "gate_class": inputs["gate_class"], "gate_file": inputs["gate_file"],
        "gate_hash": inputs["gate_hash"], "key": conv["key"], "cellm_path": conv["path"], "sha256": conv["sha256"],
        "nbytes": conv["nbytes"], "bytes_per_scheme": conv["bytes_per_scheme"],
        "tensors_per_scheme": pln["tensors_per_scheme"], "registry": registry, "eval": None, "verdict": None,
        "published": None, "onnx_dir": None, "eval_report": None, "eval_shards": 0, "eval_shard_runs": [],
        "eval_shard_pids": [], "time": time.time(),
        "build_key": pl.build_key(src["content_hash"], pln["profile_hash"], inputs["gate_hash"],
                                  pl.package_version(), inputs["gate_class"]),
    }
    # export and evaluate only read the artifact: run them concurrently on the task runner (on Dask:
    # in the sub-flow `check-artifact`, so each runs on a cluster worker)
    args = (conv["path"], key_dir, conv["key"], source, revision, src["content_hash"], conv["sha256"],
            eval_settings or {}, threads, export_onnx, evaluate, eval_shards)
    if task_runner == "threads":
        checked = _export_and_evaluate(*args)
    else:
        checked = check_artifact.with_options(task_runner=make_task_runner(task_runner))(*args)
    for name, (res, was_cached, secs) in checked.items():
        timings[name], cached[name] = secs, was_cached
        if name == "export-onnx":
            summary["onnx_dir"] = res["dir"]
        else:
            summary["eval"], summary["eval_report"], summary["eval_key"] = res["metrics"], res["report"], res["key"]
            summary["eval_shards"] = res.get("eval_shards", 0)  # eval-shard tasks run (0: one task, or reused)
            summary["eval_shard_runs"] = res.get("eval_shard_runs", [])
            summary["eval_shard_pids"] = res.get("eval_shard_pids", [])  # worker processes that ran them

    status, reason = "built", None
    if summary["eval"] is not None:
        verdict = step("gate", gate_task, summary["eval_report"], inputs["gate_class"], inputs["gate_file"])
        summary["verdict"] = verdict
        log.info("%s", verdict["summary"])
        if not verdict["passed"]:
            status, reason = "blocked", verdict["reason"]
        elif not publish:
            reason = "publishing switched off (publish=False)"
        else:
            pub = step("publish", publish_task, registry, conv["path"], src["name"], pln["profile"],
                       summary["build_key"], verdict, summary["eval"], summary["onnx_dir"], pln["profile_hash"],
                       inputs["gate_hash"])
            summary["published"] = pub
            status = "published"
            log.info("published %s to %s%s", pub["ref"], registry, " (already there)" if pub.get("reused") else "")
    else:
        reason = "evaluation switched off (evaluate=False): no gate verdict, nothing published"
    summary.update(status=status, reason=reason, timings=timings, cached=cached)
    summary = step("report", report_task, summary, work_dir)
    log.info("build %s: %s%s; report %s; plot %s", pln["profile"], status, f" ({reason})" if reason else "",
             summary["report"], summary["plot"])
    return summary


_COMMON_DOC = """Parameters: source (spec: ``gemma-3-270m``, ``hf://org/name[@rev]``, a local HF-layout dir or
a ``.gguf``), revision, profile (override the flow's default), gate (a gate class ``int8``/``int4``/``f16``
or a thresholds TOML file), registry (``file://PATH`` or ``oci://HOST/REPO``), export_onnx, evaluate,
publish, task_runner (``threads``, ``dask`` for a local cluster, or ``tcp://HOST:PORT`` of an existing
Dask scheduler), shards (tensor shards for conversion; 0 = auto), threads (per conversion), work_dir,
eval_settings (keyword arguments of ``cellm.eval.evaluate``, e.g. ``{"max_tokens": 2048}``), eval_shards
(evaluation shards: 0 = auto, 1 with ``threads``, 2 on Dask; >1 runs eval-plan → eval-shard-i → eval-merge
tasks with exactly the unsharded numbers)."""


def _make_flow(flow_name: str):
    def build(
        source: str = DEFAULT_SOURCE,
        revision: str | None = None,
        profile: str | None = None,
        gate: str | None = None,
        registry: str = DEFAULT_REGISTRY,
        export_onnx: bool = True,
        evaluate: bool = True,
        publish: bool = True,
        task_runner: str = "threads",
        shards: int = 0,
        threads: int = 2,
        work_dir: str = DEFAULT_WORK_DIR,
        eval_settings: dict | None = None,
        eval_shards: int = 0,
    ):
        summary = run_build(
            flow_name, source=source, revision=revision, profile=profile, gate=gate, registry=registry,
            export_onnx=export_onnx, evaluate=evaluate, publish=publish, task_runner=task_runner,
            shards=shards, threads=threads, work_dir=work_dir, eval_settings=eval_settings,
            eval_shards=eval_shards,
        )
        if summary["status"] == "blocked":
            return Completed(name="Blocked", message=f"blocked: {summary['reason']}", data=summary)
        return summary

    build.__name__ = flow_name.replace("-", "_")
    build.__doc__ = f"Build with profile {PROFILES[flow_name]} by default. {_COMMON_DOC}"
    return flow(name=flow_name, log_prints=True, validate_parameters=True)(build)


build_int8 = _make_flow("build-int8")
build_int4 = _make_flow("build-int4")
build_mixed_int4 = _make_flow("build-mixed-int4")
FLOWS = {"build-int8": build_int8, "build-int4": build_int4, "build-mixed-int4": build_mixed_int4}
