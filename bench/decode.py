"""Decode benchmark of the numpy runtime on the real Gemma-3 270M.

For each profile (default f16, int8-v1, mixed-int4) and weight-cache mode (default f32 and layers;
see ``cellm.runtime.load_model``), a fresh child process with 2 BLAS threads loads the artifact
(dequantizing up front), prefills a prompt from the eval corpus, then greedily decodes N tokens.
Reports prefill and decode tokens/s (wall clock), CPU seconds per decoded token (process time, all
threads: on a machine shared with other work this is the contention-free cost) and the child's peak RSS, against the targets
decode >= 25 tokens/s and peak RSS <= artifact size + 300 MiB.

    python bench/decode.py [--profiles f16,int8-v1,mixed-int4] [--cache f32,layers]
                           [--prompt-tokens 128] [--new-tokens 32] [--json OUT]

Artifacts are converted from the embedded default source into $CELLM_CACHE/bench (or
~/.cache/cellm/bench) when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TARGET_TPS = 25.0
RSS_SLACK = 300 * 1024 * 1024


def child(path: str, cache: str, prompt_tokens: int, new_tokens: int) -> None:
    import resource
    import time

    import numpy as np

    from cellm.eval.data import DEFAULT_CORPUS
    from cellm.runtime import load_model
    from cellm.runtime.tokenizer import Tokenizer

    t0 = time.perf_counter()
    model = load_model(path, threads=2, cache=cache, preload=True)
    load_s = time.perf_counter() - t0
    tok = Tokenizer.for_artifact(path)
    ids = np.asarray(tok.encode(DEFAULT_CORPUS.read_text())[:prompt_tokens], dtype=np.int64)
    st = model.new_state()
    t0 = time.perf_counter()
    logits = model.forward(ids, st, last_only=True)[-1]
    prefill_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        nxt = int(np.argmax(logits))
        logits = model.forward(np.asarray([nxt]), st, last_only=True)[-1]
    decode_s = time.perf_counter() - t0
    decode_cpu = time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": load_s, "prefill_tps": len(ids) / prefill_s, "decode_tps": new_tokens / decode_s,
                      "decode_cpu_s_per_token": decode_cpu / new_tokens,
                      "peak_rss": rss, "prompt_tokens": int(len(ids)), "new_tokens": new_tokens}))


def ensure_artifact(profile: str, out_dir: Path) -> Path:
    path = out_dir / f"gemma-3-270m-{profile}.cellm"
    if not path.exists():
        from cellm.convert import convert

        out_dir.mkdir(parents=True, exist_ok=True)
        convert("gemma-3-270m", profile, out=path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="f16,int8-v1,mixed-int4")
    ap.add_argument("--cache", default="f32,layers")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--artifacts", default=None, help="directory holding/receiving the artifacts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, metavar=("PATH", "CACHE", "PROMPT", "NEW"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
        return 0
    root = os.environ.get("CELLM_CACHE")
    out_dir = Path(a.artifacts) if a.artifacts else (Path(root) if root else Path.home() / ".cache" / "cellm") / "bench"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    rows = []
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"# numpy runtime decode benchmark (2 BLAS threads, {os.cpu_count()} CPUs, load average {load:.1f})")
    print(f"{'profile':14s} {'cache':7s} {'size MiB':>9s} {'load s':>7s} {'prefill t/s':>11s} {'decode t/s':>10s} "
          f"{'CPU s/tok':>9s} {'peak RSS MiB':>12s} {'RSS budget':>10s}  targets")
    for profile in a.profiles.split(","):
        path = ensure_artifact(profile, out_dir)
        size = path.stat().st_size
        for cache in a.cache.split(","):
            r = subprocess.run([sys.executable, __file__, "--child", str(path), cache, str(a.prompt_tokens),
                                str(a.new_tokens)], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{profile} {cache}: child failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res.update(profile=profile, cache=cache, artifact_bytes=size, rss_budget=size + RSS_SLACK)
            rows.append(res)
            ok_tps = res["decode_tps"] >= TARGET_TPS
            ok_rss = res["peak_rss"] <= res["rss_budget"]
            print(f"{profile:14s} {cache:7s} {size / 2**20:9.0f} {res['load_s']:7.1f} {res['prefill_tps']:11.1f} "
                  f"{res['decode_tps']:10.2f} {res['decode_cpu_s_per_token']:9.3f} {res['peak_rss'] / 2**20:12.0f} {res['rss_budget'] / 2**20:10.0f}  "
                  f"decode {'ok' if ok_tps else 'MISS'}, rss {'ok' if ok_rss else 'MISS'}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"load_average": load, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
