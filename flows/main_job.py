"""Main job: build the embedded default model with all three flows and say where everything is.

    python -m flows.main_job [--source gemma-3-270m] [--work-dir work] [--registry file://artifacts]
                             [--no-onnx] [--eval-max-tokens 512] [--eval-gen-tokens 16] [--full-eval]
                             [--task-runner threads|dask|tcp://...]

Runs ``build-int8``, ``build-int4`` and ``build-mixed-int4`` one after another in this process
(against ``$PREFECT_API_URL`` when set, e.g. the stack of ``infra/stack.sh``; otherwise Prefect's
temporary local server) with a quick evaluation (first 512 eval-corpus tokens, 16 greedy tokens per
prompt; ``--full-eval`` for the nightly one), then prints per profile: verdict, size, gate metrics, the artifact, the
run report, the registry reference and the size-versus-quality plot. Exit code 0 when every flow run
completed (published or blocked by its gate), 1 when one failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.main_job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="gemma-3-270m")
    ap.add_argument("--work-dir", default=os.environ.get("CELLM_WORK_DIR", "work"))
    ap.add_argument("--registry", default="file://artifacts")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    ap.add_argument("--eval-max-tokens", type=int, default=512,
                    help="evaluate on the first N eval-corpus tokens (default 512: the quick main-job eval)")
    ap.add_argument("--eval-gen-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    ap.add_argument("--full-eval", action="store_true",
                    help="the full default evaluation (whole corpus, 32 generated tokens; what nightly runs)")
    ap.add_argument("--task-runner", default="threads")
    ap.add_argument("--flows", default="build-int8,build-int4,build-mixed-int4")
    args = ap.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.build import FLOWS

    eval_settings = None if args.full_eval else {"max_tokens": args.eval_max_tokens,
                                                  "gen_tokens": args.eval_gen_tokens}
    rows, failed = [], 0
    t_all = time.perf_counter()
    for name in [n.strip() for n in args.flows.split(",") if n.strip()]:
        t0 = time.perf_counter()
        st = FLOWS[name](source=args.source, work_dir=args.work_dir, registry=args.registry,
                         export_onnx=not args.no_onnx, task_runner=args.task_runner,
                         eval_settings=eval_settings, return_state=True)
        took = time.perf_counter() - t0
        if not st.is_completed():
            failed += 1
            print(f"{name}: FAILED after {took:.1f}s: {st.message}", file=sys.stderr)
            continue
        s = st.result()
        rows.append((name, s, took))
    total = time.perf_counter() - t_all

    print()
    print(f"main job: {len(rows)} builds completed, {failed} failed, {total:.1f}s total")
    for name, s, took in rows:
        ev = s.get("eval") or {}
        pub = (s.get("published") or {}).get("ref")
        print(f"\n== {name}: profile {s['profile']} -> {s['status'].upper()} ({took:.1f}s; "
              f"reused: {', '.join(k for k, v in (s.get('cached') or {}).items() if v) or 'nothing'})")
        print(f"   size      {s['nbytes']} bytes  " + "  ".join(f"{k}={v}" for k, v in s["bytes_per_scheme"].items()))
        if ev:
            print("   metrics   " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(ev.items()) if isinstance(v, (int, float))))
        print(f"   artifact  {s['cellm_path']}")
        if s.get("onnx_dir"):
            print(f"   onnx      {s['onnx_dir']}")
        print(f"   report    {s['report']}")
        print(f"   published {pub} in {s['registry']}" if pub else f"   not published: {s.get('reason')}")
    if rows:
        print(f"\nsize-vs-quality plot: {rows[-1][1]['plot']}")
        print(f"registry: {args.registry}   work dir: {os.path.abspath(args.work_dir)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
