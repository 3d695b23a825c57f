"""`cellm quality sensitivity SOURCE` / `cellm quality allocate SOURCE --budget B -o profile.toml`."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quality",
        help="measured per-tensor sensitivity and budgeted mixed-precision profiles",
        description=(
            "Sensitivity: quantize each 2-D tensor alone (probe scheme), measure the mean next-token "
            "KL against the float32 model on calibration text, predict the other candidate schemes "
            "from the layer-output error ratio; cached per source under $CELLM_CACHE/quality/. "
            "Allocate: choose one scheme per tensor minimising the predicted KL under a byte budget "
            "and write an ordinary profile TOML."
        ),
    )
    sub = p.add_subparsers(dest="quality_cmd", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("sensitivity", help="measure (or show the cached) per-tensor sensitivity",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("source", metavar="SOURCE", help="source spec (gemma-3-270m, hf://..., a directory, a .gguf)")
    s.add_argument("--no-cache", action="store_true", help="re-measure even when cached")
    s.add_argument("--validate", type=int, default=0, metavar="N",
                   help="also measure N (tensor, scheme) pairs directly and report the rank correlation")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="measure only part I of N (run N processes in parallel; a later call merges)")
    s.add_argument("--json", action="store_true", help="print the measurements as JSON")
    s.set_defaults(func=run_sensitivity)

    a = sub.add_parser("allocate", help="write a profile minimising predicted KL under a byte budget",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("source", metavar="SOURCE")
    a.add_argument("--budget", required=True,
                   help="bytes ('240000000', '240MB') or a fraction of a profile ('0.55x-int8-v1')")
    a.add_argument("-o", "--output", required=True, metavar="PROFILE.toml")
    a.add_argument("--name", default="mixed-int4", help="profile name")
    a.add_argument("--gate-class", default="int4", choices=["int4", "int8", "f16"])
    a.add_argument("--candidates", default=None,
                   help="comma-separated schemes to choose from (default: those measured)")
    a.add_argument("--granularity", default="tensor", choices=["tensor", "family"],
                   help="tensor: one exact-name rule per tensor; family: one scheme per tensor family "
                        "across layers (a profile valid for every Gemma-3 size)")
    a.add_argument("--json", action="store_true", help="print the allocation summary as JSON")
    a.set_defaults(func=run_allocate)


def _session(source: str):
    from cellm.quality import open_session

    return open_session(source)


def run_sensitivity(args) -> int:
    from cellm.quality import sensitivity
    from cellm.quality.sensitivity import validate

    t0 = time.time()
    sess = _session(args.source)
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    sens = sensitivity(sess, use_cache=not args.no_cache, shard=shard,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.validate:
        import numpy as np

        rng = np.random.default_rng(0)
        names = sorted(sens.kl)
        others = [c for c in sens.candidates if c not in ("f16", sens.probe)]
        pairs = [(names[i], others[j]) for i, j in zip(rng.choice(len(names), args.validate),
                                                      rng.choice(len(others), args.validate))]
        validate(sess.engine, sess.ref, sess.stats, sens, pairs)
    if args.json:
        print(json.dumps(sens.to_json(), indent=1, sort_keys=True))
        return 0
    print(f"{len(sens.kl)} tensors, probe {sens.probe}, {sens.n_tokens} calibration tokens "
          f"(measured in {sens.seconds:.0f}s; this call {time.time() - t0:.0f}s)")
    top = sorted(sens.kl, key=lambda t: -sens.kl[t][sens.probe])
    print(f"{'tensor':50s} " + " ".join(f"{c:>12s}" for c in sens.candidates))
    for t in top:
        print(f"{t:50s} " + " ".join(f"{sens.kl[t][c]:12.2e}" for c in sens.candidates))
    if sens.validation:
        print(f"validation: Spearman rho = {sens.validation['spearman']:.3f} over "
              f"{len(sens.validation['pairs'])} directly measured pairs")
    return 0


def run_allocate(args) -> int:
    from cellm.quality import allocate_budget, profile_toml, sensitivity, write_profile

    t0 = time.time()
    sess = _session(args.source)
    sens = sensitivity(sess, progress=lambda m: print(m, file=sys.stderr, flush=True))
    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    if args.granularity == "family":
        from cellm.quality.allocate import by_family

        sens = by_family(sens)
    alloc = allocate_budget(sess, sens, args.budget, candidates=cands)
    text = profile_toml(alloc, sens, name=args.name, gate_class=args.gate_class,
                        patterns=args.granularity == "family")
    write_profile(args.output, text)
    summary = {
        "output": args.output, "budget_bytes": alloc.budget_bytes, "total_bytes": alloc.total_bytes,
        "predicted_kl": alloc.predicted_kl, "bytes_per_scheme": alloc.bytes_by_scheme(sens),
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print(f"wrote {args.output}: {alloc.total_bytes} bytes (budget {alloc.budget_bytes}), "
              f"predicted mean KL {alloc.predicted_kl:.4f}; "
              + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in summary["bytes_per_scheme"].items()))
    return 0
