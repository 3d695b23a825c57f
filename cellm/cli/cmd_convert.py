"""`cellm convert SOURCE --profile P [-o OUT.cellm]`: quantize a checkpoint into a .cellm file."""

from __future__ import annotations

import argparse
import json
import sys

from cellm.profile import list_profiles


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where a default means something (not None/False, not required)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Gemma-3 checkpoint into a .cellm file with a profile",
        description=(
            "Convert SOURCE into OUT.cellm (+ OUT.tokenizer.json, + OUT.NOTICE when the source has "
            "one), streaming tensor by tensor; all files are written atomically. "
            f"Shipped profiles: {', '.join(list_profiles())} (or a path to a profile .toml)."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE",
                   help="gemma-3-270m (embedded default), hf://org/name[@rev], a local HF directory or a .gguf file")
    p.add_argument("--profile", "-p", required=True, metavar="P",
                   help=f"profile name ({', '.join(list_profiles())}) or a profile .toml path")
    p.add_argument("-o", "--output", metavar="OUT.cellm", default=None,
                   help="output file (default: <source>-<profile>.cellm in --out-dir)")
    p.add_argument("--out-dir", default=".", metavar="DIR", help="directory for the default output name")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="worker threads")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.convert import convert

    bar = None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        state = {"last": 0}

        def progress(name: str, done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
                           leave=False)
            bar.update(done - state["last"])
            state["last"] = done
            bar.set_postfix_str(name[-40:], refresh=False)

    try:
        res = convert(args.source, args.profile, args.output, out_dir=args.out_dir,
                      progress=progress, threads=args.threads)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print(f"wrote {res.path} ({res.nbytes:,} bytes, sha256 {res.sha256})")
    for scheme, nb in res.bytes_per_scheme.items():
        print(f"  {scheme:<12} {nb:>14,} bytes")
    if res.tokenizer:
        print(f"tokenizer {res.tokenizer}")
    if res.notice:
        print(f"notice    {res.notice}")
    return 0
