"""`cellm show NAME[:VERSION|@CHANNEL]`: the manifest of one version (lineage, metrics, verdict)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "show",
        help="show a published version's manifest: files, lineage, metrics, gate verdict, force flag",
    )
    p.add_argument("ref", metavar="NAME[:VERSION|@CHANNEL]")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="file://PATH or oci://HOST:PORT/NAMESPACE (default: $CELLM_REGISTRY or file://artifacts)")
    p.add_argument("--json", action="store_true", help="print manifest.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.registry import open_registry

    reg = open_registry(args.registry)
    m = reg.show(args.ref)
    if args.json:
        print(m.to_bytes().decode(), end="")
    else:
        print("\n".join(m.summary_lines()))
        chans = [c for c, v in reg.list_channels(m.name).items() if v == m.version]
        if chans:
            print(f"  channels:         {', '.join(sorted(chans))}")
    return 0
