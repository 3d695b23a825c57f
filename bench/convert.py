"""Convert benchmark: wall time and peak RSS per profile, each conversion in a fresh subprocess.

    python bench/convert.py                      # 270M (real fixture) x all profiles + 1B-shaped bf16
    python bench/convert.py --only 270m --profiles int4-v1 --repeat 5
    python bench/convert.py --only 1b            # synthetic gemma-3-1b-it shapes, random bf16 weights

Checkpoints: the real Gemma-3 270M (``cellm.sources.default_model.ensure_default_checkpoint()``, F32
safetensors, built once per machine) and a synthetic checkpoint with gemma-3-1b-it's exact shapes
(``cellm.synthetic.make_checkpoint(dir, gemma3_1b_config(), dtype="BF16")``, ~2 GB, cached under
``$CELLM_CACHE/bench`` or ``~/.cache/cellm/bench``). Each run is a fresh ``python`` process that opens
the source and converts; it reports the convert() wall time, its CPU time and its own peak RSS
(``ru_maxrss``); the parent also records the whole process wall time (interpreter start + imports +
open + convert). With ``--repeat N`` the best (minimum) wall of N runs is reported, since other
processes on a shared 2-core machine only ever add time. Targets (issue 2): 270M -> int4-v1 <= 1.0 s
wall and <= 700 MiB peak RSS; 1B-shaped <= 1.5 GiB peak RSS.

On a machine shared with other sessions (Linux autogroups: ``nice`` alone only ranks processes
within one session), give the bench its own high-priority autogroup for a fair wall-time figure:

    setsid bash -c 'echo -20 > /proc/self/autogroup; exec nice -n -20 python bench/convert.py'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROFILES = ["int4-v1", "int8-v1", "mixed-int4-v1", "mixed-int4", "f16"]
MIB = 1 << 20


def child(src: str, profile: str, out_dir: str, threads: int) -> None:
    import resource

    t0 = time.perf_counter()
    from cellm.convert import convert
    from cellm.sources import open_source

    source = open_source(src)
    _ = source.content_hash  # cached per file (size, mtime); not part of the conversion proper
    t1 = time.perf_counter()
    c1 = time.process_time()
    res = convert(source, profile, out_dir=out_dir, threads=threads)
    t2 = time.perf_counter()
    print(json.dumps({
        "convert_s": t2 - t1,
        "cpu_s": time.process_time() - c1,
        "setup_s": t1 - t0,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "nbytes": res.nbytes,
        "path": str(res.path),
    }))


def run_one(src: Path, profile: str, out_dir: Path, threads: int) -> dict:
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", str(src), profile, str(out_dir), str(threads)],
        capture_output=True, text=True,
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"conversion {src.name} {profile} failed:\n{p.stderr}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    d["process_s"] = wall
    return d


def synthetic_1b(cache: Path) -> Path:
    from cellm.synthetic import gemma3_1b_config, make_checkpoint

    d = cache / "gemma3-1b-shaped-bf16"
    if (d / "model.safetensors").is_file() and (d / "config.json").is_file():
        return d
    print(f"generating the 1B-shaped bf16 checkpoint in {d} (once) ...", file=sys.stderr)
    tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
    make_checkpoint(tmp, gemma3_1b_config(), seed=0, dtype="BF16")
    os.replace(tmp, d)
    return d


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("SRC", "PROFILE", "OUT", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["270m", "1b"], default=None, help="run one checkpoint only")
    ap.add_argument("--profiles", nargs="+", default=PROFILES, help="profiles to convert with")
    ap.add_argument("--profiles-1b", nargs="+", default=["int4-v1", "mixed-int4-v1", "int8-v1"],
                    help="profiles for the 1B-shaped checkpoint")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (best wall is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source-270m", default=None, help="HF dir of the 270M (default: the cached fixture)")
    ap.add_argument("--cache", default=None, help="where the synthetic 1B checkpoint is kept")
    ap.add_argument("--json", default=None, help="also write the raw results to this file")
    args = ap.parse_args(argv)
    if args.child:
        src, prof, out, threads = args.child
        child(src, prof, out, int(threads))
        return 0

    from cellm.sources.cache import cache_root

    cache = Path(args.cache) if args.cache else cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Path, list[str], dict]] = []
    if args.only in (None, "270m"):
        if args.source_270m:
            src = Path(args.source_270m)
        else:
            from cellm.sources.default_model import ensure_default_checkpoint

            src = Path(ensure_default_checkpoint())
        jobs.append(("gemma-3-270m (F32)", src, args.profiles, {"int4-v1": (1.0, 700)}))
    if args.only in (None, "1b"):
        jobs.append(("1B-shaped synthetic (BF16)", synthetic_1b(cache), args.profiles_1b, {"*": (None, 1536)}))

    rows, raw = [], []
    load_start = load_avg()
    with tempfile.TemporaryDirectory(prefix="cellm-bench-") as out:
        for label, src, profiles, targets in jobs:
            run_one(src, profiles[0], Path(out), args.threads)  # warm page cache + hash cache
            for prof in profiles:
                runs = []
                for _ in range(max(1, args.repeat)):
                    r = run_one(src, prof, Path(out), args.threads)
                    Path(r["path"]).unlink(missing_ok=True)
                    runs.append(r)
                best = min(runs, key=lambda r: r["convert_s"])
                tw, tr = targets.get(prof, targets.get("*", (None, None)))
                ok_w = "" if tw is None else (" ✅" if best["convert_s"] <= tw else " ❌")
                ok_r = "" if tr is None else (" ✅" if max(r["maxrss_mib"] for r in runs) <= tr else " ❌")
                rows.append(
                    f"| {label} | {prof} | {best['nbytes'] / MIB:.1f} | {best['convert_s']:.2f}{ok_w} "
                    f"| {statistics.median(r['convert_s'] for r in runs):.2f} | {best['cpu_s']:.2f} "
                    f"| {best['process_s']:.2f} | {max(r['maxrss_mib'] for r in runs):.0f}{ok_r} |"
                )
                raw.append({"checkpoint": label, "profile": prof, "runs": runs})
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"threads={args.threads}, repeat={args.repeat}, load average (1/5/15 min) at start: {load_start}, "
          f"at end: {load_avg()}, cpus={os.cpu_count()}\n")
    print("| checkpoint | profile | output MiB | convert wall s (best) | median s | CPU s | process wall s "
          "| peak RSS MiB (max) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
