"""`cellm explain SOURCE --profile P`: which scheme each tensor gets, and the bytes it costs."""

from __future__ import annotations

import json

from cellm.cli.cmd_convert import HelpFormatter

from cellm.profile import list_profiles


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="show the per-tensor plan (scheme, bytes) a profile gives a checkpoint",
        description=(
            "Print, for every tensor of SOURCE, the scheme PROFILE selects (first matching rule) and "
            "its bytes including companion .qscale/.qzero tensors; totals per scheme and overall. "
            f"Shipped profiles: {', '.join(list_profiles())}."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint spec (as for `cellm convert`)")
    p.add_argument("--profile", "-p", required=True, metavar="P", help="profile name or .toml path")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.profile import load_profile
    from cellm.sources import open_source

    src = open_source(args.source)
    prof = load_profile(args.profile)
    plan = prof.plan({n: tuple(src.shape(n)) for n in src.tensor_names()})
    if args.json:
        d = plan.to_dict()
        d.update(source=src.name, profile_sha256=prof.content_hash, gate_class=prof.gate_class)
        print(json.dumps(d, indent=2))
        return 0
    print(f"profile {prof.name} ({prof.description}); gate class {prof.gate_class}")
    for r in prof.rules:
        print(f"  rule {r.index}: '{r.pattern}'{' ndim=%d' % r.ndim if r.ndim else ''} -> {r.scheme}"
              f"{'  # ' + r.note if r.note else ''}")
    w = max([len(e.name) for e in plan.entries] + [6])
    print(f"{'tensor':<{w}}  {'shape':<16} {'scheme':<10} {'bytes':>14}")
    for e in plan.entries:
        print(f"{e.name:<{w}}  {'x'.join(map(str, e.shape)):<16} {e.scheme:<10} {e.nbytes:>14,}")
    print()
    for s, nb in plan.bytes_per_scheme.items():
        print(f"{'total ' + s:<{w}}  {plan.tensors_per_scheme[s]:>5} tensors{'':<17} {nb:>14,}")
    print(f"{'total':<{w}}  {len(plan.entries):>5} tensors{'':<17} {plan.total_bytes:>14,}"
          f"  ({plan.total_bytes / 2**20:.1f} MiB)")
    return 0
