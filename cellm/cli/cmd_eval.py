"""`cellm eval CANDIDATE --reference SOURCE`: quality metrics, reports and (optionally) the gate."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a candidate against a reference (KL, top-1, perplexity, generations)")
    p.add_argument("candidate", help=".cellm file (or a source spec / HF dir)")
    p.add_argument("--reference", required=True, help="reference source (spec, HF dir, .gguf) or .cellm")
    p.add_argument("--corpus", default=None, help="UTF-8 text for teacher forcing (default: packaged corpus)")
    p.add_argument("--prompts", default=None, help="prompt file, one per line (default: packaged prompts)")
    p.add_argument("--json", dest="json_out", default=None, help="write the JSON report here")
    p.add_argument("--markdown", default=None, help="write the markdown report here")
    p.add_argument("--gate", action="store_true", help="apply the quality gate; exit 1 when it fails")
    p.add_argument("--gate-class", default=None, help="gate class (default: the artifact's profile class)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--top-k", type=int, default=256, help="reference tokens cached per position for KL")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4088, help="score the first N corpus tokens (default 4088 = 8 windows; 0 = all)")
    p.add_argument("--no-cache", action="store_true", help="recompute the reference side")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellm.errors import EvalError
    from cellm.eval import evaluate, write_json, write_markdown
    from cellm.gates import check_gates

    tty = sys.stderr.isatty()

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        if tty:
            print(f"\r{stage}: {done}/{total}   ", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(("" if tty else f"{stage}: {done}/{total}"), file=sys.stderr, flush=True)

    report = evaluate(
        args.candidate, args.reference, corpus=args.corpus, prompts=args.prompts, window=args.window,
        top_k=args.top_k, gen_tokens=args.gen_tokens, max_tokens=args.max_tokens,
        use_cache=not args.no_cache, threads=args.threads, progress=progress,
    )
    verdict = None
    if args.gate:
        cls = args.gate_class or report.gate_class
        if not cls:
            raise EvalError("--gate needs --gate-class: the candidate does not name a profile with a gate class")
        verdict = check_gates(report, cls)
    m = report.metrics
    print(f"candidate: {report.candidate}\nreference: {report.reference}")
    for k in ("mean_kl", "p99_kl", "top1_agreement", "ppl_candidate", "ppl_reference", "ppl_ratio",
              "gen_agreement_mean", "gen_exact_match_rate", "gen_repetition_rate", "gen_degenerate_rate", "tokens"):
        print(f"  {k:24s} {m[k]:.6g}")
    print(f"  ({report.settings['total_seconds']} s; reference cached: {report.settings['reference_cached']})")
    if args.json_out:
        write_json(report, args.json_out, verdict)
    if args.markdown:
        write_markdown(report, args.markdown, verdict)
    if verdict is not None:
        print(verdict.summary())
        if not verdict.passed:
            missed = "; ".join(f"{c.metric} {c.value:.4g} {c.op} {c.threshold:g} missed by {-c.margin:.4g}"
                               for c in verdict.failures)
            print(f"cellm: gate {verdict.gate_class} FAILED: {missed}", file=sys.stderr)
            return 1
    return 0
