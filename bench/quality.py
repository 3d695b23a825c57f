"""Quality Pareto benchmark: bytes vs mean KL of profiles on a real source, plus the cost timings.

    python bench/quality.py [--source gemma-3-270m] [--out docs] [--points all|NAME,...] [--cost]

Every point is a REAL artifact: converted with ``cellm.convert.convert`` and evaluated with
``cellm.eval.evaluate`` (project eval corpus, teacher-forced KL / top-1 against the float32 source)
and ``cellm.gates.check_gates``. Results are appended to ``<out>/quality-int4-pareto.json`` (one entry per
point, re-used unless ``--redo``) and rendered to ``<out>/quality-int4-pareto.md`` and
``<out>/quality-int4-pareto.png``.

``--cost`` times the full process: calibration statistics (cached or not), sensitivity (cached),
allocation under 0.55x-int8-v1, and conversion with the allocated profile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = r"model\.layers\.\d+"

# extra (non-shipped) reference points: name -> (rules, description)
RTN_POINTS = {
    "rtn-g32-mlp": ([(LAYERS + r"\.mlp\..*\.weight", "q4g32")], "RTN q4g32 on MLP, rest f16"),
    "rtn-g32-attn-mlp-emb-i8": ([(LAYERS + r"\.(self_attn|mlp)\..*\.weight", "q4g32"),
                                 (r"model\.embed_tokens\.weight", "i8")],
                                "RTN q4g32 on attention+MLP, embedding i8"),
    "gptq-g32-attn-mlp-emb-i8": ([(LAYERS + r"\.(self_attn|mlp)\..*\.weight", "q4g32-gptq"),
                                  (r"model\.embed_tokens\.weight", "i8")],
                                 "GPTQ q4g32 on attention+MLP, embedding i8"),
    "i8-all-emb-q4g32-gptq": ([(LAYERS + r"\.(self_attn|mlp)\..*\.weight", "i8"),
                               (r"model\.embed_tokens\.weight", "q4g32-gptq")],
                              "attention+MLP i8, embedding GPTQ q4g32"),
    "int8-v1-emb-i8": ([(LAYERS + r"\.(self_attn|mlp)\..*\.weight", "i8"),
                        (r"model\.embed_tokens\.weight", "i8")],
                       "everything i8 per-row (embedding too)"),
}
SHIPPED = ["int8-v1", "mixed-int4-v1", "int4-v1"]
ALLOC_BUDGETS = {"alloc-0.45x": "0.45x-int8-v1", "alloc-0.55x": "0.55x-int8-v1", "alloc-0.65x": "0.65x-int8-v1"}


def _toml(name: str, rules, desc: str) -> str:
    out = [f'name = "{name}"', f'description = "{desc}"', 'gate_class = "int4"', ""]
    for pat, sch in rules:
        out += ["[[rules]]", f"pattern = '{pat}'", "ndim = 2", f'scheme = "{sch}"', ""]
    out += ["[[rules]]", "pattern = '.*'", 'scheme = "f16"', ""]
    return "\n".join(out)


def profile_for(point: str, source, workdir: Path) -> tuple[str, str]:
    """(profile path or name, description)."""
    from cellm.profile import list_profiles, load_profile

    if point in SHIPPED or point in list_profiles():
        return point, load_profile(point).description
    if point in RTN_POINTS:
        rules, desc = RTN_POINTS[point]
        p = workdir / f"{point}.toml"
        p.write_text(_toml(point, rules, desc))
        return str(p), desc
    if point in ALLOC_BUDGETS:
        from cellm.quality import allocate_budget, open_session, profile_toml, sensitivity, write_profile

        sess = open_session(source)
        sens = sensitivity(sess)
        alloc = allocate_budget(sess, sens, ALLOC_BUDGETS[point])
        p = workdir / f"{point}.toml"
        write_profile(p, profile_toml(alloc, sens, name=point))
        return str(p), f"allocation under {ALLOC_BUDGETS[point]} (predicted KL {alloc.predicted_kl:.4f})"
    raise SystemExit(f"unknown point {point}")


def run_point(point: str, source: str, workdir: Path) -> dict:
    from cellm.convert import convert
    from cellm.eval import evaluate
    from cellm.gates import check_gates
    from cellm.sources import open_source

    src = open_source(source)
    prof, desc = profile_for(point, source, workdir)
    t0 = time.time()
    res = convert(src, prof, workdir / f"{point}.cellm")
    t_conv = time.time() - t0
    t0 = time.time()
    rep = evaluate(res.path, src)
    t_eval = time.time() - t0
    verdict = check_gates(rep, "int4")
    m = rep.metrics
    row = {
        "point": point, "description": desc, "file_bytes": os.path.getsize(res.path),
        "tensor_bytes": sum(res.bytes_per_scheme.values()), "bytes_per_scheme": res.bytes_per_scheme,
        "mean_kl": m["mean_kl"], "top1_agreement": m["top1_agreement"], "p99_kl": m.get("p99_kl"),
        "ppl_ratio": m.get("ppl_ratio"), "int4_gate": bool(verdict.passed),
        "convert_s": round(t_conv, 1), "eval_s": round(t_eval, 1),
    }
    res.path.unlink(missing_ok=True)
    return row


def render(rows: list[dict], out: Path, int8_bytes: int | None) -> None:
    rows = sorted(rows, key=lambda r: r["file_bytes"])
    lines = ["| point | description | MB | × int8-v1 | mean KL | top-1 | int4 gate | measured with |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{r['file_bytes'] / int8_bytes:.3f}" if int8_bytes else "–"
        gate = {True: "pass", False: "fail", None: "–"}[r.get("int4_gate")]
        lines.append(f"| {r['point']} | {r['description']} | {r['file_bytes'] / 1e6:.1f} | {frac} | "
                     f"{r['mean_kl']:.4f} | {100 * r['top1_agreement']:.1f}% | {gate} | "
                     f"{r.get('method', 'cellm.eval (convert + 4088 eval tokens)')} |")
    (out / "quality-int4-pareto.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        mine = r["point"].startswith(("alloc", "mixed-int4-gemma3", "gptq", "i8-all-emb", "new:"))
        official = "method" not in r
        ax.scatter(r["file_bytes"] / 1e6, r["mean_kl"], marker="*" if mine else "o",
                   s=160 if mine else 50, color="tab:red" if mine else "tab:blue",
                   edgecolors="black" if official else "none")
        ax.annotate(r["point"], (r["file_bytes"] / 1e6, r["mean_kl"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    if int8_bytes:
        ax.axvline(0.55 * int8_bytes / 1e6, color="gray", ls="--", lw=1)
        ax.text(0.55 * int8_bytes / 1e6, 0.97, " 0.55x int8-v1 budget", fontsize=7, color="gray",
                transform=ax.get_xaxis_transform(), va="top")
    ax.axhline(0.05, color="tab:orange", ls=":", lw=1)
    ax.axhline(0.03, color="tab:green", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean next-token KL vs float32 (nats, log scale)")
    ax.set_title("Gemma-3 270M: size vs quality (red stars: new; black edge: cellm.eval on a real file)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quality-int4-pareto.png", dpi=120)


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cost(source: str, workdir: Path) -> dict:
    """Wall and CPU seconds of each step (CPU time is the fair figure on a shared machine; run under
    ``setsid bash -c 'echo -20 > /proc/self/autogroup; exec nice -n -20 python bench/quality.py --cost
    --points none'`` for a fair wall time)."""
    from cellm.convert import convert
    from cellm.quality import allocate_budget, open_session, profile_toml, sensitivity, write_profile
    from cellm.sources import open_source

    t: dict[str, list[float]] = {}

    def step(name, w0, c0):
        t[name] = [round(time.time() - w0, 1), round(_cpu() - c0, 1)]

    w0, c0 = time.time(), _cpu()
    W0, C0 = w0, c0
    sess = open_session(source)
    step("session: weights + calibration stats (cached)", w0, c0)
    w0, c0 = time.time(), _cpu()
    sens = sensitivity(sess)
    step("sensitivity (cached)", w0, c0)
    t["sensitivity first measurement (recorded wall, sharded: max over shards)"] = [round(sens.seconds, 1), None]
    w0, c0 = time.time(), _cpu()
    alloc = allocate_budget(sess, sens, "0.55x-int8-v1")
    p = write_profile(workdir / "alloc.toml", profile_toml(alloc, sens))
    step("allocation + profile", w0, c0)
    del sess
    w0, c0 = time.time(), _cpu()
    res = convert(open_source(source), p, workdir / "alloc.cellm", threads=2)
    step("quantize with the allocation (convert, threads=2)", w0, c0)
    step("full process with sensitivity cached", W0, C0)
    res.path.unlink(missing_ok=True)
    return {k: {"wall_s": v[0], "cpu_s": v[1]} for k, v in t.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="gemma-3-270m")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--points", default="all")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--cost", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "quality-int4-pareto.json"
    data = json.loads(store.read_text()) if store.is_file() else {"points": {}}
    points = (SHIPPED + list(RTN_POINTS) + list(ALLOC_BUDGETS) + ["mixed-int4"]) if args.points == "all" \
        else [p for p in args.points.split(",") if p and p != "none"]
    with tempfile.TemporaryDirectory(prefix="cellm-qbench-") as td:
        work = Path(td)
        if args.cost:
            c = cost(args.source, work)
            data["cost"] = c
            print(json.dumps(c, indent=1))
        for pt in points:
            if pt in data["points"] and not args.redo:
                continue
            row = run_point(pt, args.source, work)
            data["points"][pt] = row
            print(json.dumps(row), flush=True)
            store.write_text(json.dumps(data, indent=1, sort_keys=True))
    store.write_text(json.dumps(data, indent=1, sort_keys=True))
    int8 = data["points"].get("int8-v1", {}).get("file_bytes") or data.get("int8_v1_bytes")
    rows = [dict(v, point=k) for k, v in data.get("reference_points", {}).items()]
    render(list(data["points"].values()) + rows, out, int8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
