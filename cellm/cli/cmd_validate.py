"""`cellm validate FILE [--source SOURCE]`: structure, semantics and numerics checks of a .cellm."""

from __future__ import annotations

import json

from cellm.cli.cmd_convert import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a .cellm file (structure, Gemma-3 semantics, numerics vs --source)",
        description=(
            "Structure: bounds, 64-byte alignment, overlaps, nbytes vs dtype/shape, duplicate names, "
            "sort order, header keys. Semantics: every Gemma-3 tensor present with the config's shape, "
            "companion .qscale/.qzero present and shaped right, scales finite and > 0, no NaN/Inf, "
            "cellm_extensions. Numerics (with --source): each tensor's dequantization error within its "
            "scheme's bound. Exit 0 = valid, 1 = problems found (each names the tensor and offset), "
            "2 = error."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="the .cellm file")
    p.add_argument("--source", default=None, metavar="SOURCE",
                   help="source checkpoint to compare the dequantized weights against")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.validate import validate

    rep = validate(args.file, source=args.source)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        for prob in rep.problems:
            print(str(prob))
        c = rep.checked
        verdict = "OK" if rep.ok else f"INVALID ({len(rep.problems)} problem(s))"
        print(f"{rep.path}: {verdict}; {c.get('tensors', 0)} tensor entries, "
              f"{c.get('semantics', 0)} checked semantically, {c.get('numerics', 0)} against the source")
    return 0 if rep.ok else 1
