"""`cellm ls [NAME]`: list artifact names, or the versions and channels of one name."""

from __future__ import annotations

import json

from cellm.errors import CellmError


def register(subparsers) -> None:
    p = subparsers.add_parser("ls", help="list artifacts in a registry (names, or versions of NAME)")
    p.add_argument("name", nargs="?", default=None, metavar="NAME")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="file://PATH or oci://HOST:PORT/NAMESPACE (default: $CELLM_REGISTRY or file://artifacts)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.registry import open_registry

    reg = open_registry(args.registry)
    if args.name is None:
        rows = []
        for n in reg.list_names():
            rows.append({"name": n, "versions": reg.list_versions(n), "channels": reg.list_channels(n)})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            if not rows:
                print(f"(no artifacts in {reg.url})")
            for r in rows:
                ch = ", ".join(f"{c}={v}" for c, v in sorted(r["channels"].items()))
                print(f"{r['name']}  {len(r['versions'])} version(s), newest {r['versions'][-1]}"
                      + (f"  [{ch}]" if ch else ""))
        return 0
    versions = reg.list_versions(args.name)
    channels = reg.list_channels(args.name)
    rows = []
    for v in versions:
        chans = sorted(c for c, cv in channels.items() if cv == v)
        try:
            m = reg.show(f"{args.name}:{v}")
        except CellmError as exc:  # one broken version must not hide the others
            rows.append({"version": v, "error": str(exc), "channels": chans})
            continue
        rows.append({"version": v, "created": m.created, "profile": m.profile, "bytes": m.total_bytes,
                     "passed": m.passed, "forced": m.forced, "channels": chans})  # fmt: skip
    if args.json:
        print(json.dumps({"name": args.name, "versions": rows, "channels": channels}, indent=2))
        return 0
    if not rows:
        from cellm.errors import RegistryNotFound

        raise RegistryNotFound(f"no versions of {args.name!r} in {reg.url}; names: {reg.list_names()}")
    for r in rows:
        if "error" in r:
            print(f"{args.name}:{r['version']}  BROKEN: {r['error']}")
            continue
        gate = "FORCED-UNSAFE" if r["forced"] else ("passed" if r["passed"] else "NOT-PASSED")
        ch = f"  [{', '.join(r['channels'])}]" if r["channels"] else ""
        print(f"{args.name}:{r['version']}  {r['created']}  {r['profile']}  {r['bytes']} B  {gate}{ch}")
    return 0
