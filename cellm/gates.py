"""Quality gates: thresholds per profile class (``cellm/gates.toml``) applied to an eval report."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional

from cellm.errors import ConfigError, GateFailed

GATES_FILE = Path(__file__).resolve().parent / "gates.toml"
OPS = {"max": "<=", "min": ">="}


@dataclasses.dataclass(frozen=True)
class GateCheck:
    metric: str
    value: float
    threshold: float
    op: str  # "<=" or ">="
    passed: bool
    margin: float  # >= 0 passes; negative = missed by that much

    def describe(self) -> str:
        state = "ok" if self.passed else f"MISSED by {-self.margin:.4g}"
        return f"{self.metric} = {self.value:.6g} (must be {self.op} {self.threshold:g}): {state}"


@dataclasses.dataclass(frozen=True)
class GateVerdict:
    passed: bool
    gate_class: str
    checks: tuple[GateCheck, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "gate_class": self.gate_class,
                "checks": [dataclasses.asdict(c) for c in self.checks]}

    @property
    def failures(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        head = f"gate {self.gate_class}: {'PASS' if self.passed else 'FAIL'}"
        return "\n".join([head] + ["  " + c.describe() for c in self.checks])

    def raise_if_failed(self) -> None:
        if not self.passed:
            missed = "; ".join(c.describe() for c in self.failures)
            raise GateFailed(f"quality gate {self.gate_class!r} failed: {missed}", verdict=self)


def load_gates(path: Optional[str | os.PathLike] = None) -> dict[str, dict[str, tuple[str, float]]]:
    """{class: {metric: (op, threshold)}} from the TOML file."""
    p = Path(path) if path is not None else GATES_FILE
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read gates file {p}: {exc}") from exc
    out: dict[str, dict[str, tuple[str, float]]] = {}
    for cls, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: [{cls}] must be a table")
        rules = {}
        for metric, spec in table.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in OPS:
                raise ConfigError(f"{p}: {cls}.{metric}={spec!r} must be {{ max = X }} or {{ min = X }}")
            kind, thr = next(iter(spec.items()))
            if isinstance(thr, bool) or not isinstance(thr, (int, float)):
                raise ConfigError(f"{p}: {cls}.{metric}.{kind}={thr!r} must be a number")
            rules[metric] = (OPS[kind], float(thr))
        out[cls] = rules
    return out


def _metrics_of(report: Any) -> Mapping[str, Any]:
    if hasattr(report, "metrics"):
        return report.metrics
    if isinstance(report, Mapping):
        return report.get("metrics", report)
    raise ConfigError(f"cannot read metrics from {type(report).__name__}")


def check_gates(report: Any, gate_class: str, gates_file: Optional[str | os.PathLike] = None) -> GateVerdict:
    """Apply the thresholds of ``gate_class`` to an EvalReport (or its dict / a flat metrics dict)."""
    gates = load_gates(gates_file)
    if gate_class not in gates:
        raise ConfigError(f"unknown gate class {gate_class!r}; known: {', '.join(sorted(gates))}")
    m = _metrics_of(report)
    checks = []
    for metric, (op, thr) in sorted(gates[gate_class].items()):
        if metric not in m:
            raise ConfigError(f"report has no metric {metric!r} required by gate class {gate_class!r}")
        v = float(m[metric])
        margin = (thr - v) if op == "<=" else (v - thr)
        ok = math.isfinite(v) and margin >= 0
        checks.append(GateCheck(metric, v, thr, op, ok, margin if math.isfinite(v) else -math.inf))
    return GateVerdict(all(c.passed for c in checks), gate_class, tuple(checks))
