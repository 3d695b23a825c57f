"""`cellm` console command.

Each sub-command lives in its own module ``cellm/cli/cmd_<name>.py`` exposing
``register(subparsers) -> None``; modules are discovered automatically, so adding a command never
touches this file. A command's handler returns an int exit code. Library errors (``CellmError``)
are printed as ``cellm: error: <message>`` and exit with code 2 (1 is reserved for "gate failed"
and "validation failed" verdicts).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from cellm import __version__
from cellm.errors import CellmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellm",
        description="Build, quantize, validate, evaluate, export and publish .cellm on-device models.",
    )
    parser.add_argument("--version", action="version", version=f"cellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    pkg = importlib.import_module(__name__)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CellmError as exc:
        print(f"cellm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cellm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
