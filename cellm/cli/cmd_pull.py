"""`cellm pull NAME[:VERSION|@CHANNEL] -o DIR`: download a bundle, verifying every sha256."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pull",
        help="download a published bundle and verify every file's sha256",
        description=(
            "Download NAME (channel latest), NAME:VERSION or NAME@CHANNEL into DIR (absent or empty). "
            "Every file is checked against manifest.json (bytes and sha256); a mismatch fails with "
            "exit code 2 and leaves DIR untouched. An interrupted pull is resumed by running it again "
            "(verified files staged in .DIR.partial are reused, partial ones discarded)."
        ),
    )
    p.add_argument("ref", metavar="NAME[:VERSION|@CHANNEL]")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="file://PATH or oci://HOST:PORT/NAMESPACE (default: $CELLM_REGISTRY or file://artifacts)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.registry import open_registry

    reg = open_registry(args.registry)

    def progress(event: str, path: str, nbytes: int) -> None:
        if not args.json:
            print(f"  {event:<8} {nbytes:>12}  {path}", file=sys.stderr)

    res = reg.pull(args.ref, args.output, progress=progress)
    m = res.manifest
    if args.json:
        print(json.dumps({"name": m.name, "version": m.version, "path": str(res.path),
                          "files": [f.to_dict() for f in m.files], "fetched": list(res.fetched),
                          "reused": list(res.reused), "forced": m.forced}, indent=2))  # fmt: skip
    else:
        print(f"pulled {m.name}:{m.version} from {reg.url} -> {res.path}: {len(m.files)} files, "
              f"{m.total_bytes} bytes, every sha256 verified ({len(res.fetched)} fetched, "
              f"{len(res.reused)} reused)")
        if m.forced:
            print(f"WARNING: {m.name}:{m.version} was published with --force-unsafe: "
                  f"{m.force_unsafe.get('reason')}")
    return 0
