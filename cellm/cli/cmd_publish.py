"""`cellm publish NAME:VERSION --cellm FILE --verdict|--eval JSON`: gated publish to a registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cellm.errors import RegistryError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "publish",
        help="publish a quality-gated bundle (.cellm, ONNX dir, tokenizer, NOTICE) to a registry",
        description=(
            "Publish an immutable version NAME:VERSION. Requires a passing gate verdict (--verdict "
            "verdict.json, or --eval report.json holding one / checked with --gate-class). "
            "--force-unsafe --reason TEXT publishes without one; the force and its reason are "
            "recorded in the manifest and shown by `cellm show`. Tokenizer and NOTICE sidecars "
            "(<stem>.tokenizer.json, <stem>.NOTICE) are found next to the .cellm file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("ref", metavar="NAME:VERSION", help="artifact name and new version")
    p.add_argument("--cellm", required=True, metavar="FILE", help="the .cellm file")
    p.add_argument("--onnx", metavar="DIR", default=None, help="ONNX export directory (all files)")
    p.add_argument("--tokenizer", metavar="FILE", action="append", default=None,
                   help="tokenizer file(s) (default: sidecars next to the .cellm)")
    p.add_argument("--notice", metavar="FILE", default=None, help="licence NOTICE (default: sidecar)")
    p.add_argument("--extra", metavar="FILE", action="append", default=[], help="additional file(s)")
    p.add_argument("--verdict", metavar="JSON", default=None, help="gate verdict JSON ({'passed': ...})")
    p.add_argument("--eval", metavar="JSON", default=None, dest="eval_report",
                   help="eval report JSON (its 'verdict', or gates checked with --gate-class)")
    p.add_argument("--gate-class", default=None,
                   help="gate class to check an eval report against (default: the profile's, from the .cellm header)")
    p.add_argument("--metrics", metavar="JSON", default=None, help="metrics JSON (default: from --eval)")
    p.add_argument("--profile", default=None, help="profile name (default: from the .cellm header)")
    p.add_argument("--channel", action="append", default=None, metavar="CH",
                   help="channel(s) to move to the new version (repeatable; default: latest)")
    p.add_argument("--no-channel", action="store_true", help="move no channel")
    p.add_argument("--force-unsafe", action="store_true",
                   help="publish without a passing verdict (requires --reason; recorded in the manifest)")
    p.add_argument("--reason", default=None, help="why --force-unsafe is needed")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="file://PATH or oci://HOST:PORT/NAMESPACE (default: $CELLM_REGISTRY or file://artifacts)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def _load_json(path: str, what: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise RegistryError(f"{what} file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{what} file {path} is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise RegistryError(f"{what} file {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def load_verdict_and_metrics(verdict_path, eval_path, gate_class, metrics_path, fallback_gate_class=None):
    """Verdict: --verdict file; else the eval report checked with --gate-class; else the verdict the
    report holds; else the report checked with the profile's gate class (from the .cellm header)."""
    verdict, metrics = None, {}
    if verdict_path:
        verdict = _load_json(verdict_path, "verdict")
        if "passed" not in verdict:
            raise RegistryError(f"verdict file {verdict_path} has no 'passed' key: {sorted(verdict)}")
    if eval_path:
        report = _load_json(eval_path, "eval report")
        if isinstance(report.get("metrics"), dict):
            metrics = report["metrics"]
        else:
            metrics = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))}
        if verdict is None:
            embedded = report.get("verdict") if isinstance(report.get("verdict"), dict) else None
            if gate_class or not (embedded and "passed" in embedded or "passed" in report):
                gate_class = gate_class or fallback_gate_class
            if gate_class:
                from cellm.gates import check_gates  # the runtime area's gate checker

                verdict = check_gates(report, gate_class)
            elif embedded and "passed" in embedded:
                verdict = embedded
            elif "passed" in report:
                verdict = report
            else:
                raise RegistryError(
                    f"eval report {eval_path} holds no gate verdict; pass --gate-class to check the gates"
                )
    if metrics_path:
        metrics = _load_json(metrics_path, "metrics")
    return verdict, metrics


def run(args) -> int:
    from cellm.registry import BundleSpec, open_registry
    from cellm.registry.names import parse_ref

    ref = parse_ref(args.ref)
    if ref.version is None:
        raise RegistryError(f"publish needs NAME:VERSION, got {args.ref!r}")
    fallback = None
    if args.gate_class is None and args.eval_report and not args.verdict:
        from cellm.registry.bundle import header_profile, read_cellm_header

        fallback = header_profile(read_cellm_header(Path(args.cellm)))[2]  # the profile's gate class
    verdict, metrics = load_verdict_and_metrics(args.verdict, args.eval_report, args.gate_class, args.metrics,
                                                fallback)  # fmt: skip
    spec = BundleSpec.from_cellm(args.cellm, ref.name, ref.version, onnx_dir=args.onnx, metrics=metrics,
                                 profile=args.profile)  # fmt: skip
    changes = {"extra_files": tuple(args.extra)}
    if args.tokenizer is not None:
        changes["tokenizer_files"] = tuple(args.tokenizer)
    if args.notice is not None:
        changes["notice"] = args.notice
    import dataclasses

    spec = dataclasses.replace(spec, **changes)
    channels = () if args.no_channel else tuple(args.channel or ("latest",))
    reg = open_registry(args.registry)
    m = reg.publish(spec, verdict, force_unsafe=args.force_unsafe, reason=args.reason, channels=channels)
    if m.forced:
        print(f"cellm: WARNING: {m.name}:{m.version} published with --force-unsafe "
              f"(reason: {m.force_unsafe['reason']}); recorded in its manifest", file=sys.stderr)
    if args.json:
        print(m.to_bytes().decode(), end="")
    else:
        print(f"published {m.name}:{m.version} to {reg.url}"
              + (f" (channels: {', '.join(channels)})" if channels else ""))
        print("\n".join(m.summary_lines()))
    return 0
