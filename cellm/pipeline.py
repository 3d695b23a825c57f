"""Library side of the build pipeline: content keys, content-addressed outputs, step records.

The Prefect flows in ``flows/`` call these pure functions (plus the other ``cellm`` modules); nothing
here imports Prefect. The layout of a build's work directory::

    <work>/<source-name>/<convert-key>/<source-name>-<profile>.cellm   (+ .tokenizer.json, .NOTICE)
    <work>/<source-name>/<convert-key>/convert.json     step record (sha256 of the .cellm, bytes...)
    <work>/<source-name>/<convert-key>/onnx/            ONNX export
    <work>/<source-name>/<convert-key>/eval-<key>.json  evaluation report (keyed by the eval config)
    <work>/<source-name>/runs/<run-key>.json            one summary per finished build (for plots)
    <work>/<source-name>/size_vs_quality.png

Keys are sha256 digests of the content that decides an output: the source checkpoint's content hash
(commit), the profile file's hash, the gate thresholds' hash and the package version. A step record is
written (atomically) only after its output is complete and verified, so a build killed at any point
leaves either a finished, verifiable output or nothing that the next run would trust; stale temp
files of killed runs are removed under a per-key lock (``fcntl.flock``, released by the kernel when
the holder dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from cellm.errors import CellmError

__all__ = [
    "step_key", "build_key", "file_sha256", "gate_config_hash", "safe_name", "key_dir",
    "write_json_atomic", "read_json", "write_record", "load_record", "find_output",
    "clean_stale_temp", "key_lock", "record_run", "collect_runs", "check_build_params",
    "TEMP_PATTERNS",
]

# Names the writers in cellm use for in-progress files (temp + rename). Anything matching one of these
# inside a key directory that is not held by a live writer (see key_lock) is a leftover of a killed run.
TEMP_PATTERNS = (
    re.compile(r".*\.tmp(\..*)?$"),
    re.compile(r".*\.tmp-.*"),
    re.compile(r"^\..*\.tmp.*"),
    re.compile(r".*\.partial$"),
    re.compile(r"^tmp[a-z0-9_]{6,}(\..*)?$"),  # tempfile.mkstemp/mkdtemp default names
)


class PipelineError(CellmError, ValueError):
    """Bad build parameters or an inconsistent work directory."""


def step_key(*parts: Any) -> str:
    """sha256 (hex, 24 chars) of the JSON encoding of ``parts`` (order matters)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def build_key(source_hash: str, profile_hash: str, gate_hash: str, version: str, *extra: Any) -> str:
    """The key of a whole build: same source content, profile, gate thresholds and package version
    → same key → the finished outputs can be reused."""
    return step_key("build", source_hash, profile_hash, gate_hash, version, *extra)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the one implementation lives in ``cellm.sources.cache``)."""
    from cellm.sources.cache import sha256_file

    return sha256_file(Path(path))


def gate_config_hash(gate: str | os.PathLike | None = None) -> str:
    """sha256 of the gate thresholds file in force: ``gate`` when it is a TOML file, else the shipped
    ``cellm/gates.toml`` (the gate class itself is part of the build key separately)."""
    if gate is not None and (Path(str(gate)).suffix == ".toml" or os.sep in str(gate)):
        p = Path(str(gate))
        if not p.is_file():
            raise PipelineError(f"gate thresholds file {str(gate)!r} does not exist")
        return file_sha256(p)
    shipped = Path(__file__).with_name("gates.toml")
    return file_sha256(shipped) if shipped.is_file() else hashlib.sha256(b"").hexdigest()


def safe_name(s: str) -> str:
    """A filesystem-friendly name for a source spec or profile (``hf://org/x@rev`` → ``org-x-rev``)."""
    s = re.sub(r"^[a-z]+://", "", str(s))
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.")
    return s or "source"


def key_dir(work_dir: str | os.PathLike, source_name: str, key: str) -> Path:
    return Path(work_dir) / safe_name(source_name) / key


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (temp file + fsync + rename; see :func:`cellm.atomic.write_json`)."""
    from cellm.atomic import write_json

    return write_json(path, obj, indent=2, default=str, newline=True)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_record(directory: str | os.PathLike, step: str, data: dict[str, Any]) -> Path:
    """Record a finished step (``<dir>/<step>.json``); call only after its outputs are complete."""
    return write_json_atomic(Path(directory) / f"{step}.json", {"step": step, "time": time.time(), **data})


def load_record(directory: str | os.PathLike, step: str, verify: tuple[str, ...] = ("path",)) -> dict | None:
    """The record of a finished step, or None when absent, unreadable, or when a file it names (keys in
    ``verify``; each with a matching ``<key>_sha256`` or ``sha256`` entry) is missing or changed."""
    p = Path(directory) / f"{step}.json"
    try:
        rec = read_json(p)
    except (OSError, ValueError):
        return None
    for k in verify:
        f = rec.get(k)
        if f is None:
            continue
        want = rec.get(f"{k}_sha256") or (rec.get("sha256") if k == "path" else None)
        fp = Path(f)
        if not fp.is_file():
            return None
        if want and file_sha256(fp) != want:
            return None
    return rec


def find_output(directory: str | os.PathLike, step: str = "convert") -> Path | None:
    """The verified main output of a finished step (its ``path``), or None."""
    rec = load_record(directory, step)
    return Path(rec["path"]) if rec and rec.get("path") else None


def clean_stale_temp(directory: str | os.PathLike, patterns=TEMP_PATTERNS) -> list[Path]:
    """Remove leftovers of killed runs (temp files/dirs) under ``directory``; returns what was removed.

    Call while holding :func:`key_lock` for that directory, so a live writer's temp file is never
    touched."""
    import shutil

    root = Path(directory)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        for n in list(dirnames):
            if any(p.fullmatch(n) for p in patterns):
                shutil.rmtree(Path(dirpath) / n, ignore_errors=True)
                removed.append(Path(dirpath) / n)
                dirnames.remove(n)
        for n in filenames:
            if n == ".lock":
                continue
            if any(p.fullmatch(n) for p in patterns):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(dirpath) / n)
                    removed.append(Path(dirpath) / n)
    return removed


@contextlib.contextmanager
def key_lock(directory: str | os.PathLike, timeout: float = 3600.0) -> Iterator[Path]:
    """Exclusive lock on a key directory (``<dir>/.lock``, flock: freed by the kernel if the holder
    is killed). Two builds of the same key serialise; the second then finds the finished output."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PipelineError(f"key directory {d} still locked after {timeout:.0f} s") from None
                time.sleep(0.2)
        yield d
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def record_run(work_dir: str | os.PathLike, source_name: str, run_key: str, summary: dict) -> Path:
    """Save a finished build's summary for later cross-profile reports."""
    return write_json_atomic(Path(work_dir) / safe_name(source_name) / "runs" / f"{run_key}.json", summary)


def collect_runs(work_dir: str | os.PathLike, source_name: str) -> list[dict]:
    """All recorded builds of one source (latest per profile first-come order by time)."""
    d = Path(work_dir) / safe_name(source_name) / "runs"
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            out.append(read_json(p))
    latest: dict[str, dict] = {}
    for r in sorted(out, key=lambda r: r.get("time", 0)):
        latest[str(r.get("profile"))] = r
    return sorted(latest.values(), key=lambda r: str(r.get("profile")))


_REGISTRY_RE = re.compile(r"^(file|oci)://\S+$")


def check_build_params(*, source: str, registry: str, threads: int = 1, shards: int = 1,
                       task_runner: str = "threads") -> None:
    """Reject bad build parameters before any work starts (messages name the value and the limit)."""
    if not isinstance(source, str) or not source.strip():
        raise PipelineError(f"source={source!r} must be a non-empty source spec")
    if not isinstance(registry, str) or not _REGISTRY_RE.match(registry):
        raise PipelineError(f"registry={registry!r} must be a file://PATH or oci://HOST/REPO url")
    if not isinstance(threads, int) or not 1 <= threads <= 256:
        raise PipelineError(f"threads={threads!r} must be an integer in [1, 256]")
    if not isinstance(shards, int) or not 0 <= shards <= 1024:
        raise PipelineError(f"shards={shards!r} must be an integer in [0, 1024] (0 = auto)")
    ok = task_runner in ("threads", "dask") or task_runner.startswith(("tcp://", "dask://", "tls://"))
    if not ok:
        raise PipelineError(
            f"task_runner={task_runner!r} must be 'threads', 'dask' (a local cluster) or the "
            f"address of an existing Dask scheduler (tcp://HOST:PORT)"
        )


# --------------------------------------------------------------------------------------------------
# Steps: one library call each, content-addressed and resumable. The flows' tasks call these.
# --------------------------------------------------------------------------------------------------

def check_inputs(*, source: str, profile: str, gate: str | None, registry: str, threads: int = 2,
                 shards: int = 1, task_runner: str = "threads") -> dict[str, Any]:
    """Everything that can be checked before touching the source: parameters, the profile file and
    the gate override. Raises the library's error (ProfileError, PipelineError...)."""
    from cellm.profile import GATE_CLASSES, load_profile

    check_build_params(source=source, registry=registry, threads=threads, shards=shards,
                       task_runner=task_runner)
    prof = load_profile(profile)
    if gate is not None and gate not in GATE_CLASSES and not Path(str(gate)).is_file():
        raise PipelineError(
            f"gate={gate!r} must be a gate class ({', '.join(GATE_CLASSES)}) or an existing thresholds file"
        )
    return {"profile": prof.name, "profile_hash": prof.content_hash,
            "gate_class": gate if gate in GATE_CLASSES else prof.gate_class,
            "gate_file": str(Path(gate).resolve()) if gate and gate not in GATE_CLASSES else None,
            "gate_hash": gate_config_hash(gate if gate and gate not in GATE_CLASSES else None)}


def package_version() -> str:
    from cellm import __version__

    return __version__


def open_checked(spec: str, revision: str | None = None, content_hash: str | None = None):
    """Open a source; when ``content_hash`` is given, fail if the content changed since the fetch."""
    from cellm.sources import open_source

    ck = open_source(spec, revision=revision) if revision else open_source(spec)
    if content_hash and getattr(ck, "content_hash", None) and ck.content_hash != content_hash:
        raise PipelineError(
            f"source {spec!r} changed during the build: content hash {ck.content_hash[:16]} "
            f"!= {content_hash[:16]} recorded at fetch"
        )
    return ck


def fetch_source(spec: str, revision: str | None = None) -> dict[str, Any]:
    """Resolve a source (downloading / building it into the cache when needed) → JSON-able facts."""
    ck = open_checked(spec, revision)
    prov = dict(getattr(ck, "provenance", {}) or {})
    return {
        "spec": spec, "revision": revision, "name": ck.name, "path": str(ck.path),
        "content_hash": ck.content_hash, "provenance": json.loads(json.dumps(prov, default=str)),
        "commit": prov.get("commit"),
    }


def plan_summary(spec: str, revision: str | None, profile: str, content_hash: str | None = None) -> dict[str, Any]:
    """``profile explain``: the per-scheme tensor counts and bytes the profile gives this source."""
    from cellm.profile import load_profile

    prof = load_profile(profile)
    ck = open_checked(spec, revision, content_hash)
    plan = prof.plan({n: tuple(ck.shape(n)) for n in ck.tensor_names()})
    return {
        "profile": prof.name, "profile_path": str(prof.path), "profile_hash": prof.content_hash,
        "gate_class": prof.gate_class, "bytes_per_scheme": plan.bytes_per_scheme,
        "tensors_per_scheme": plan.tensors_per_scheme, "total_bytes": plan.total_bytes,
        "tensors": len(plan.entries),
    }


def convert_key(source_hash: str, profile_hash: str, version: str | None = None) -> str:
    return step_key("convert", source_hash, profile_hash, version or package_version())


@contextlib.contextmanager
def _convert_slot(spec: str, revision: str | None, work_dir: str | os.PathLike, source_hash: str,
                  profile_hash: str) -> Iterator[tuple[Any, str, Path, list[str], dict | None]]:
    """The convert key directory, locked, stale temp files removed: ``(source, key, dir, cleaned,
    finished record or None)`` — shared by :func:`convert_step` and :func:`assemble_shards`."""
    ck = open_checked(spec, revision, source_hash)
    key = convert_key(source_hash, profile_hash)
    d = key_dir(work_dir, ck.name, key)
    with key_lock(d):
        cleaned = [str(p) for p in clean_stale_temp(d)]
        yield ck, key, d, cleaned, load_record(d, "convert")


def convert_step(spec: str, revision: str | None, profile: str, work_dir: str | os.PathLike, *,
                 source_hash: str, profile_hash: str, threads: int = 2) -> dict[str, Any]:
    """Convert into ``<work>/<source>/<key>/``; reuse a finished, sha256-verified output of the same
    key (no work), after removing temp files a killed run left there."""
    from cellm.convert import convert

    with _convert_slot(spec, revision, work_dir, source_hash, profile_hash) as (ck, key, d, cleaned, rec):
        if rec is not None:
            return {**rec, "reused": True, "cleaned": cleaned}
        t0 = time.perf_counter()
        res = convert(ck, profile, out_dir=d, threads=threads)
        info = res.to_dict()
        from cellm.profile import load_profile

        prof = load_profile(profile)
        plan = prof.plan({n: tuple(ck.shape(n)) for n in ck.tensor_names()})
        rec = {**info, "key": key, "dir": str(d), "source_hash": source_hash,
               "tensors_per_scheme": plan.tensors_per_scheme, "seconds": time.perf_counter() - t0}
        write_record(d, "convert", rec)
    return {**rec, "reused": False, "cleaned": cleaned}


def validate_step(cellm_path: str, spec: str | None = None, revision: str | None = None,
                  source_hash: str | None = None) -> dict[str, Any]:
    """Validate a .cellm (numerics against the source when given); raise ValidationError if not ok."""
    from cellm.errors import ValidationError
    from cellm.validate import validate

    src = open_checked(spec, revision, source_hash) if spec else None
    rep = validate(cellm_path, source=src)
    d = rep.to_dict() if hasattr(rep, "to_dict") else {"ok": rep.ok, "problems": [str(p) for p in rep.problems]}
    if not rep.ok:
        probs = "; ".join(str(p) for p in rep.problems[:5])
        raise ValidationError(f"{cellm_path}: {len(rep.problems)} validation problem(s): {probs}")
    return d


def export_step(cellm_path: str, directory: str | os.PathLike, *, accuracy_level: int = 4,
                int8_residual: bool = False) -> dict[str, Any]:
    """ONNX export into ``<dir>/onnx`` (reused when its record has the same artifact and settings and
    its files are all there with their recorded sizes)."""
    from cellm.onnx_export import export_onnx

    d = Path(directory)
    out = d / "onnx"
    with key_lock(d):
        clean_stale_temp(d)
        rec = load_record(d, "onnx", verify=())
        if (rec is not None and rec.get("cellm_sha256") == file_sha256(cellm_path)
                and rec.get("accuracy_level") == accuracy_level
                and bool(rec.get("int8_residual", False)) == int8_residual
                and all((out / f).is_file() and (out / f).stat().st_size == n for f, n in rec.get("files", {}).items())):
            return {**rec, "reused": True}
        t0 = time.perf_counter()
        export_onnx(cellm_path, out, accuracy_level=accuracy_level, int8_residual=int8_residual, force=True)
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
        rec = {"dir": str(out), "files": files, "cellm_sha256": file_sha256(cellm_path),
               "accuracy_level": accuracy_level, "int8_residual": int8_residual,
               "seconds": time.perf_counter() - t0}
        write_record(d, "onnx", rec)
    return {**rec, "reused": False}


def eval_key(cellm_sha256: str, source_hash: str, settings: dict[str, Any]) -> str:
    return step_key("eval", cellm_sha256, source_hash, settings, package_version())


def evaluate_step(cellm_path: str, spec: str, revision: str | None, directory: str | os.PathLike, *,
                  source_hash: str, cellm_sha256: str, settings: dict[str, Any] | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Evaluate the artifact against the f32 source; the JSON/markdown reports go to
    ``<dir>/eval-<key>.{json,md}`` and are reused when the same artifact/settings were evaluated."""
    from cellm.eval import evaluate

    settings, key, d, step = _eval_slot(cellm_sha256, source_hash, settings, directory)
    with _finished_eval(d, step) as rec:
        if rec is not None:
            return {**rec, "reused": True}
        t0 = time.perf_counter()
        ref = open_checked(spec, revision, source_hash)
        rep = evaluate(cellm_path, ref, threads=threads, **settings)  # plan → shards → merge, in process
        rec = _write_eval_record(d, step, key, rep, settings, seconds=time.perf_counter() - t0)
    return {**rec, "reused": False}


def _eval_slot(cellm_sha256: str, source_hash: str, settings: dict[str, Any] | None,
               directory: str | os.PathLike) -> tuple[dict[str, Any], str, Path, str]:
    """(settings, content key, key directory, step name) of one evaluation."""
    settings = dict(settings or {})
    key = eval_key(cellm_sha256, source_hash, settings)
    return settings, key, Path(directory), f"eval-{key}"


@contextlib.contextmanager
def _finished_eval(d: Path, step: str) -> Iterator[dict[str, Any] | None]:
    """Under the key lock, stale temp files removed: the evaluation's verified record, or None."""
    with key_lock(d):
        clean_stale_temp(d)
        yield load_record(d, step, verify=("report",))


def _write_eval_record(d: Path, step: str, key: str, rep: Any, settings: dict[str, Any],
                       **extra: Any) -> dict[str, Any]:
    """The JSON + markdown reports of an evaluation and its step record (call under the key lock)."""
    from cellm.eval.evaluate import write_json, write_markdown

    jpath, mpath = d / f"{step}.report.json", d / f"{step}.report.md"
    write_json(rep, jpath)
    write_markdown(rep, mpath)
    rec = {"key": key, "report": str(jpath), "report_sha256": file_sha256(jpath), "markdown": str(mpath),
           "metrics": dict(rep.metrics), "settings": settings, **extra}
    write_record(d, step, rec)
    return rec


def _eval_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in dict(settings or {}).items() if k != "shards"}


def eval_plan_step(cellm_path: str, spec: str, revision: str | None, directory: str | os.PathLike, *,
                   source_hash: str, cellm_sha256: str, settings: dict[str, Any] | None = None,
                   shards: int = 2, threads: int | None = None) -> dict[str, Any]:
    """Sharded evaluation, step 1: the finished evaluation's record when there is one (``reused``), else
    the plan (``<dir>/eval-<key>.plan.json``; the reference side computed once into its cache)."""
    from cellm.eval.shards import plan_eval_shards

    settings, key, d, step = _eval_slot(cellm_sha256, source_hash, settings, directory)
    with _finished_eval(d, step) as rec:
        if rec is not None:
            return {**rec, "reused": True}
    t0 = time.perf_counter()
    ref = open_checked(spec, revision, source_hash)
    plan = plan_eval_shards(cellm_path, ref, shards, threads=threads, **_eval_settings(settings))
    with key_lock(d):
        path = plan.save(d / f"{step}.plan.json")
    return {"key": key, "plan": str(path), "plan_sha256": file_sha256(path), "shards": len(plan.shards),
            "reference_cached": plan.reference_cached, "seconds": time.perf_counter() - t0, "reused": False}


def eval_shard_step(plan_path: str, cellm_path: str, index: int, *, threads: int | None = None) -> dict[str, Any]:
    """Sharded evaluation, step 2: shard ``index`` of the plan → ``<dir>/eval-<key>.shard-<i>.npz``
    (the raw per-token values; written under the key lock so no temp-file cleaner races it)."""
    from cellm.eval.shards import EvalPlan, run_shard, save_shard

    plan_path = str(plan_path)
    if not plan_path.endswith(".plan.json"):
        raise PipelineError(f"eval plan {plan_path!r} must be an eval-<key>.plan.json written by eval_plan_step")
    plan = EvalPlan.load(plan_path)
    res = run_shard(cellm_path, plan, index, threads=threads)
    out = Path(plan_path[: -len(".plan.json")] + f".shard-{index:04d}.npz")
    with key_lock(out.parent):
        save_shard(res, out)
    return {"path": str(out), "sha256": file_sha256(out), "index": index, "positions": int(len(res.kl)),
            "prompts": len(res.generations), "seconds": res.seconds, "pid": os.getpid()}


def eval_merge_step(plan_path: str, shard_files: list[str], spec: str, revision: str | None,
                    directory: str | os.PathLike, *, source_hash: str, cellm_sha256: str,
                    settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sharded evaluation, step 3: merge the shards into the same reports and record as
    :func:`evaluate_step` writes (same numbers); the plan and shard files are removed."""
    from cellm.eval.shards import EvalPlan, merge_eval_shards

    settings, key, d, step = _eval_slot(cellm_sha256, source_hash, settings, directory)
    if Path(plan_path).name != f"{step}.plan.json":
        raise PipelineError(f"eval plan {plan_path} does not belong to evaluation {step} (artifact/settings changed)")
    with key_lock(d):
        rec = load_record(d, step, verify=("report",))
        if rec is not None:
            return {**rec, "reused": True}
        t0 = time.perf_counter()
        ref = open_checked(spec, revision, source_hash)
        plan = EvalPlan.load(plan_path)
        rep = merge_eval_shards(plan, shard_files, ref)
        rec = _write_eval_record(
            d, step, key, rep, settings, shards=len(plan.shards),
            seconds=plan.reference_seconds + rep.settings["candidate_seconds"] + time.perf_counter() - t0)
        for f in [*shard_files, plan_path]:
            Path(f).unlink(missing_ok=True)
    return {**rec, "reused": False}


def gate_step(eval_report: str, gate_class: str, gates_file: str | None = None) -> dict[str, Any]:
    """Apply the gate thresholds to an evaluation report (JSON file) → the verdict as a dict with a
    one-line ``reason`` when it failed."""
    from cellm.gates import check_gates

    v = check_gates(read_json(eval_report), gate_class, gates_file)
    out = v.to_dict()
    out["reason"] = None if v.passed else (
        f"quality gate {gate_class!r} failed: " + "; ".join(c.describe() for c in v.failures))
    out["summary"] = v.summary()
    return out


def artifact_name(source_name: str, profile: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", f"{source_name}-{profile}".lower()).strip("-._")[:128]


def publish_step(registry: str, cellm_path: str, *, source_name: str, profile: str, build_key: str,
                 verdict: dict, metrics: dict | None = None, onnx_dir: str | None = None,
                 profile_hash: str | None = None, gate_hash: str | None = None,
                 channels: tuple[str, ...] = ("latest",)) -> dict[str, Any]:
    """Gated publish of the bundle as ``<source>-<profile>:<version>+<build key>`` (idempotent: an
    unchanged rebuild finds its version already published and does not publish again)."""
    from cellm.errors import RegistryNotFound
    from cellm.registry import open_registry
    from cellm.registry.bundle import BundleSpec

    reg = open_registry(registry)
    name = artifact_name(source_name, profile)
    version = f"{package_version()}+{build_key[:12]}"
    ref = f"{name}:{version}"
    try:
        existing = reg.list_versions(name)
    except RegistryNotFound:
        existing = []
    if version in existing:
        return {"ref": ref, "name": name, "version": version, "registry": registry, "reused": True}
    spec = BundleSpec.from_cellm(cellm_path, name, version, onnx_dir=onnx_dir, metrics=metrics or {},
                                 verdict=verdict, profile=profile, profile_hash=profile_hash,
                                 gate_config_hash=gate_hash)
    m = reg.publish(spec, verdict, channels=channels)
    return {"ref": ref, "name": name, "version": version, "registry": registry, "reused": False,
            "files": len(getattr(m, "files", ()) or ())}


# --------------------------------------------------------------------------------------------------
# Sharded conversion (scale-out): quantize groups of tensors independently (any process / machine
# that can open the source), then assemble the shards into the same bytes `convert` writes.
# --------------------------------------------------------------------------------------------------

def _plan_of(ck, profile):
    from cellm.profile import load_profile

    prof = load_profile(profile)
    return prof, prof.plan({n: tuple(ck.shape(n)) for n in ck.tensor_names()})


def shard_plan(spec: str, revision: str | None, profile: str, shards: int,
               source_hash: str | None = None) -> list[list[str]]:
    """Split the plan's tensors into ``shards`` groups of similar source bytes (deterministic:
    largest first, each to the currently smallest group; groups listed in name order)."""
    import math

    if not isinstance(shards, int) or shards < 1:
        raise PipelineError(f"shards={shards!r} must be an integer >= 1")
    ck = open_checked(spec, revision, source_hash)
    _, plan = _plan_of(ck, profile)
    sizes = sorted(((4 * math.prod(e.shape), e.name) for e in plan.entries), key=lambda t: (-t[0], t[1]))
    groups: list[list[str]] = [[] for _ in range(min(shards, len(sizes)) or 1)]
    load = [0] * len(groups)
    for size, name in sizes:
        i = min(range(len(groups)), key=lambda j: (load[j], j))
        groups[i].append(name)
        load[i] += size
    return [sorted(g) for g in groups if g]


def quantize_shard(spec: str, revision: str | None, profile: str, names: list[str],
                   directory: str | os.PathLike, *, source_hash: str, index: int) -> dict[str, Any]:
    """Quantize the tensors ``names`` exactly as :func:`cellm.convert.convert` does (same row chunks,
    same schemes) into ``<dir>/shards/<index>-<hash>.npz`` (atomic; reused when already there)."""
    import numpy as np

    from cellm import convert as cv

    ck = open_checked(spec, revision, source_hash)
    prof, plan = _plan_of(ck, profile)
    want = set(names)
    missing = want - {e.name for e in plan.entries}
    if missing:
        raise PipelineError(f"shard {index}: tensors not in the plan: {sorted(missing)[:5]}")
    d = Path(directory) / "shards"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{index:04d}-{step_key('shard', source_hash, prof.content_hash, sorted(want), package_version())}.npz"
    if out.is_file():
        return {"path": str(out), "sha256": file_sha256(out), "tensors": len(want), "reused": True}
    sub = dataclasses_replace_entries(plan, [e for e in plan.entries if e.name in want])
    parts: dict[str, list] = {}
    for entry, _rows, chunk in cv.quantize_items(ck, sub):
        for suf, arr in chunk.items():
            parts.setdefault(entry.name + suf, []).append(arr)
    arrays = {k: (v[0] if len(v) == 1 else np.concatenate(v, axis=0)) for k, v in parts.items()}
    from cellm.atomic import atomic_write

    atomic_write(out, lambda f: np.savez(f, **{_npz_key(k): a for k, a in arrays.items()}))
    return {"path": str(out), "sha256": file_sha256(out), "tensors": len(want), "reused": False}


def dataclasses_replace_entries(plan, entries):
    import dataclasses

    return dataclasses.replace(plan, entries=tuple(entries))


def _npz_key(name: str) -> str:
    return name.replace("/", "%2F")


def assemble_shards(spec: str, revision: str | None, profile: str, shard_files: list[str],
                    work_dir: str | os.PathLike, *, source_hash: str, profile_hash: str) -> dict[str, Any]:
    """Write the ``.cellm`` (and sidecars) of a sharded conversion into the same content-addressed
    key directory :func:`convert_step` uses, from the shards' arrays, through convert's
    :func:`cellm.convert.write_artifact` (same header, sidecars, atomicity; sha256 computed while
    writing); the bytes equal a direct conversion's."""
    import numpy as np

    from cellm import convert as cv

    with _convert_slot(spec, revision, work_dir, source_hash, profile_hash) as (ck, key, d, cleaned, rec):
        if rec is not None:
            return {**rec, "reused": True, "cleaned": cleaned}
        prof, plan = _plan_of(ck, profile)
        t0 = time.perf_counter()
        loaded = [np.load(f, allow_pickle=False) for f in shard_files]
        where = {}
        for z in loaded:
            for k in z.files:
                where[k] = z
        final = d / cv.default_output_name(ck.name, prof.name)

        def fill(writer) -> None:
            for name in writer.names:
                z = where.get(_npz_key(name))
                if z is None:
                    raise PipelineError(f"no shard holds tensor {name!r} ({len(shard_files)} shards)")
                writer.write(name, z[_npz_key(name)])

        try:
            res = cv.write_artifact(ck, prof, plan, final, fill)
        finally:
            for z in loaded:
                z.close()
        for f in shard_files:  # the shards are as big as the artifact: drop them once it exists
            Path(f).unlink(missing_ok=True)
        rec = {**res.to_dict(), "key": key, "dir": str(d),
               "source_hash": source_hash, "tensors_per_scheme": plan.tensors_per_scheme,
               "shards": len(shard_files), "seconds": time.perf_counter() - t0}
        write_record(d, "convert", rec)
    return {**rec, "reused": False, "cleaned": cleaned}
