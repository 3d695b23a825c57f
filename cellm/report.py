"""Run reports of the build pipeline: markdown, a flat table, and a size-versus-quality PNG.

Pure functions over a build *summary* (a JSON-able dict the flow assembles from the step results)::

    {"source": ..., "source_hash": ..., "profile": ..., "gate_class": ..., "key": ...,
     "cellm_path": ..., "sha256": ..., "nbytes": ..., "bytes_per_scheme": {...},
     "eval": {"mean_kl": ..., "p99_kl": ..., "top1": ..., "ppl": ...} | None,
     "verdict": {"passed": bool, "checks": [{"metric", "value", "threshold", "op", "passed"}, ...]} | None,
     "status": "published" | "blocked" | "built", "published": {...} | None, "reason": str | None,
     "timings": {step: seconds}, "cached": {step: bool}, "plot": path | None}

matplotlib is imported lazily (Agg backend) only by :func:`size_quality_png`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = ["normalize_checks", "run_report_markdown", "run_report_table", "size_quality_png", "human_bytes"]

QUALITY_METRIC = "mean_kl"  # what the size-vs-quality plot puts on the y axis


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None else str(v)


def normalize_checks(verdict: dict | None) -> list[dict]:
    """Gate checks as a list of ``{metric, value, op, threshold, passed}`` whatever the verdict's shape
    (a list of check dicts, or a mapping metric → check)."""
    if not verdict:
        return []
    checks = verdict.get("checks", [])
    if isinstance(checks, dict):
        checks = [{"metric": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in checks.items()]
    out = []
    for c in checks:
        if not isinstance(c, dict):
            c = {k: getattr(c, k) for k in ("metric", "value", "op", "threshold", "passed") if hasattr(c, k)}
        out.append({
            "metric": c.get("metric", c.get("name", "?")),
            "value": c.get("value", c.get("actual")),
            "op": c.get("op", c.get("comparison", "")),
            "threshold": c.get("threshold", c.get("limit")),
            "passed": bool(c.get("passed", c.get("ok", False))),
        })
    return out


def run_report_markdown(s: dict) -> str:
    """The markdown run report (profile, bytes per scheme, gate metrics vs thresholds, verdict,
    where it was published or why not)."""
    status = s.get("status", "built")
    lines = [
        f"# Build `{s.get('profile')}` of `{s.get('source')}` — **{status.upper()}**",
        "",
        f"- source: `{s.get('source')}` (content `{str(s.get('source_hash', ''))[:16]}`)",
        f"- profile: `{s.get('profile')}` (hash `{str(s.get('profile_hash', ''))[:16]}`), gate class `{s.get('gate_class')}`",
        f"- build key: `{s.get('key')}`",
        f"- artifact: `{s.get('cellm_path')}` ({human_bytes(s.get('nbytes'))}, sha256 `{s.get('sha256')}`)",
    ]
    if s.get("onnx_dir"):
        lines.append(f"- ONNX export: `{s['onnx_dir']}`")
    if s.get("eval_report"):
        lines.append(f"- evaluation report: `{s['eval_report']}`")
    lines += ["", "## Bytes per scheme", "", "| scheme | tensors | bytes | share |", "|---|---:|---:|---:|"]
    bps = s.get("bytes_per_scheme") or {}
    tps = s.get("tensors_per_scheme") or {}
    total = sum(bps.values()) or 1
    for scheme, n in sorted(bps.items()):
        lines.append(f"| {scheme} | {tps.get(scheme, '-')} | {n} ({human_bytes(n)}) | {100 * n / total:.1f}% |")
    lines.append(f"| **total** | {sum(tps.values()) if tps else '-'} | {sum(bps.values())} ({human_bytes(sum(bps.values()))}) | 100% |")
    ev = s.get("eval")
    lines += ["", "## Quality gate", ""]
    checks = normalize_checks(s.get("verdict"))
    if checks:
        lines += ["| metric | value | threshold | result |", "|---|---:|---:|---|"]
        for c in checks:
            lines.append(f"| {c['metric']} | {_fmt(c['value'])} | {c['op']} {_fmt(c['threshold'])} | "
                         f"{'pass' if c['passed'] else '**FAIL**'} |")
    elif ev:
        lines.append("No gate was checked; metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(ev.items())
                                                                   if isinstance(v, (int, float))))
    else:
        lines.append("Not evaluated (evaluation switched off), so no gate verdict.")
    v = s.get("verdict")
    lines += ["", f"**Verdict: {'PASSED' if v and v.get('passed') else ('FAILED' if v else 'none')}** — {status}", ""]
    if status == "published":
        pub = s.get("published") or {}
        lines.append(f"Published to `{s.get('registry')}` as `{pub.get('ref', pub)}`.")
    else:
        lines.append(f"Not published: {s.get('reason') or 'publishing switched off'}.")
    if s.get("plot"):
        lines += ["", "## Size versus quality", "", f"![size vs quality]({s['plot']})", "", f"Plot file: `{s['plot']}`"]
    t = s.get("timings") or {}
    if t:
        cached = s.get("cached") or {}
        lines += ["", "## Steps", "", "| step | seconds | reused |", "|---|---:|---|"]
        for k, sec in t.items():
            lines.append(f"| {k} | {sec:.2f} | {'yes' if cached.get(k) else 'no'} |")
    return "\n".join(lines) + "\n"


def run_report_table(s: dict) -> list[dict[str, Any]]:
    """Rows for a table artifact (one per gate check plus size rows); keys lowercase with dashes."""
    rows: list[dict[str, Any]] = []
    for scheme, n in sorted((s.get("bytes_per_scheme") or {}).items()):
        rows.append({"kind": "bytes", "name": scheme, "value": n, "threshold": "", "result": ""})
    rows.append({"kind": "bytes", "name": "total", "value": s.get("nbytes"), "threshold": "", "result": ""})
    for c in normalize_checks(s.get("verdict")):
        rows.append({"kind": "gate", "name": c["metric"], "value": c["value"],
                     "threshold": f"{c['op']} {c['threshold']}".strip(), "result": "pass" if c["passed"] else "fail"})
    rows.append({"kind": "verdict", "name": s.get("profile"), "value": s.get("status"), "threshold": "",
                 "result": s.get("reason") or ""})
    return rows


def size_quality_png(runs: Iterable[dict], out_path: str | os.PathLike, *, source: str = "",
                     metric: str = QUALITY_METRIC) -> Path:
    """Scatter of artifact size (MiB) against ``metric`` for every profile built for one source;
    written atomically. Runs without the metric are drawn on the x axis with an 'n/a' label."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    try:
        for r in runs:
            size = (r.get("nbytes") or 0) / 2**20
            y = (r.get("eval") or {}).get(metric)
            status = r.get("status", "built")
            color = {"published": "tab:green", "blocked": "tab:red"}.get(status, "tab:gray")
            y_plot = y if y is not None else 0.0
            ax.scatter([size], [y_plot], s=60, color=color, marker="o" if y is not None else "x")
            ax.annotate(f"{r.get('profile')} ({status}{'' if y is not None else ', n/a'})", (size, y_plot),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.margins(x=0.3, y=0.15)
        ys = [(r.get("eval") or {}).get(metric) for r in runs]
        ys = [y for y in ys if isinstance(y, (int, float)) and y > 0]
        if ys and max(ys) / min(ys) > 20:  # KLs of int8 and int4 differ by orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("artifact size (MiB)")
        ax.set_ylabel(f"{metric} vs f32 reference (lower is better)")
        ax.set_title(f"size vs quality: {source}" if source else "size vs quality")
        ax.grid(True, alpha=0.3)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return out


def write_run_report(summary: dict, work_dir: str | os.PathLike) -> dict:
    """Record this build under ``<work>/<source>/runs/``, redraw the source's size-vs-quality PNG from
    every recorded build (one point per profile, latest run) and write the markdown report next to the
    artifact (``<key dir>/report.md``) and as ``<work>/<source>/<profile>.report.md``. Returns the
    summary with ``plot`` and ``report`` filled in."""
    from cellm import pipeline as pl

    s = dict(summary)
    src_dir = Path(work_dir) / pl.safe_name(s["source_name"])
    png = src_dir / "size_vs_quality.png"
    s["plot"] = str(png)
    key_dir = Path(s["cellm_path"]).parent
    s["report"] = str(key_dir / "report.md")
    run_key = pl.step_key("run", s.get("key"), s.get("gate_class"), s.get("gate_hash"), s.get("eval_key"))
    pl.record_run(work_dir, s["source_name"], run_key, s)
    size_quality_png(pl.collect_runs(work_dir, s["source_name"]), png, source=str(s.get("source")))
    md = run_report_markdown(s)
    for p in (key_dir / "report.md", src_dir / f"{pl.safe_name(str(s['profile']))}.report.md"):
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        with os.fdopen(fd, "w") as f:
            f.write(md)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    return s
