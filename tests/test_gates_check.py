"""Gate thresholds: verdicts, margins, config errors."""

from __future__ import annotations

import dataclasses

import pytest

from cellm.errors import ConfigError, GateFailed
from cellm.gates import check_gates, load_gates

GOOD = {"mean_kl": 0.004, "top1_agreement": 0.97, "ppl_ratio": 1.01, "gen_degenerate_rate": 0.0, "p99_kl": 0.05}


def test_int8_pass_and_fail_with_margins():
    v = check_gates({"metrics": GOOD}, "int8")
    assert v.passed and v.gate_class == "int8"
    byname = {c.metric: c for c in v.checks}
    assert byname["mean_kl"].op == "<=" and byname["mean_kl"].threshold == 0.01
    assert byname["mean_kl"].margin == pytest.approx(0.006)
    assert byname["top1_agreement"].margin == pytest.approx(0.02)
    bad = dict(GOOD, mean_kl=0.03, top1_agreement=0.9)
    v = check_gates(bad, "int8")
    assert not v.passed
    assert {c.metric for c in v.failures} == {"mean_kl", "top1_agreement"}
    assert {c.metric: round(c.margin, 6) for c in v.failures} == {"mean_kl": -0.02, "top1_agreement": -0.05}
    with pytest.raises(GateFailed, match=r"mean_kl = 0.03 \(must be <= 0.01\): MISSED by 0.02") as ei:
        v.raise_if_failed()
    assert ei.value.verdict is v
    d = v.to_dict()
    assert d["passed"] is False and len(d["checks"]) == len(v.checks)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.passed = True  # type: ignore[misc]


def test_int4_class_is_looser_and_nan_fails():
    m = dict(GOOD, mean_kl=0.04, top1_agreement=0.9)
    assert not check_gates(m, "int8").passed
    assert check_gates(m, "int4").passed
    assert not check_gates(dict(m, mean_kl=float("nan")), "int4").passed


def test_unknown_class_missing_metric_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown gate class 'int2'"):
        check_gates(GOOD, "int2")
    with pytest.raises(ConfigError, match="no metric 'ppl_ratio'"):
        check_gates({"mean_kl": 0.0, "top1_agreement": 1.0, "gen_degenerate_rate": 0.0}, "int8")
    f = tmp_path / "g.toml"
    f.write_text("[x]\nmean_kl = { below = 1 }\n")
    with pytest.raises(ConfigError, match="max = X"):
        load_gates(f)
    f.write_text("[x]\nmean_kl = { max = 0.5 }\n")
    assert load_gates(f) == {"x": {"mean_kl": ("<=", 0.5)}}
    assert check_gates({"mean_kl": 0.6}, "x", gates_file=f).failures[0].margin == pytest.approx(-0.1)


def test_shipped_classes():
    g = load_gates()
    assert g["int8"]["mean_kl"] == ("<=", 0.01) and g["int8"]["top1_agreement"] == (">=", 0.95)
    assert g["int4"]["mean_kl"] == ("<=", 0.05) and g["int4"]["top1_agreement"] == (">=", 0.88)
    assert g["f16"]["mean_kl"][1] < g["int8"]["mean_kl"][1]
