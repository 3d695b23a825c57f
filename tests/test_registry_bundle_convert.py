"""A real bundle: `cellm convert` output of the tiny synthetic checkpoint (+ its ONNX export), gated
by the real `cellm.gates.check_gates`, published, pulled, and usable after the pull."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import cellm
from cellm.cli import main
from cellm.errors import UnsafePublishError
from cellm.registry import BundleSpec, open_registry, verify_dir

GOOD = {"mean_kl": 0.001, "p99_kl": 0.01, "top1_agreement": 0.99, "ppl_ratio": 1.001, "gen_degenerate_rate": 0.0}
BAD = {**GOOD, "mean_kl": 0.5}


@pytest.fixture(scope="module")
def built(tiny_ckpt, tmp_path_factory):
    from cellm.convert import convert
    from cellm.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("build")
    res = convert(str(tiny_ckpt), "int8-v1", out / "tiny-int8.cellm")
    onnx_dir = export_onnx(res.path, out / "onnx", context_length=64)
    return res, Path(onnx_dir)


def test_converted_bundle_publishes_with_lineage_and_pulls_usable(built, tmp_path):
    from cellm.format.reader import CellmReader
    from cellm.gates import check_gates
    from cellm.validate import validate

    res, onnx_dir = built
    reg = open_registry(f"file://{tmp_path / 'reg'}")
    spec = BundleSpec.from_cellm(res.path, "tiny-gemma-int8", "2026.11.28-1", onnx_dir=onnx_dir, metrics=GOOD)
    with pytest.raises(UnsafePublishError, match="mean_kl"):
        reg.publish(spec, check_gates({"metrics": BAD}, "int8"))
    m = reg.publish(spec, check_gates({"metrics": GOOD}, "int8"))

    with CellmReader(res.path) as r:
        header = dict(r.header)
    assert m.profile == "int8-v1" and m.profile_hash == res.profile_hash == header["cellm_profile"]["sha256"]
    assert m.source == header["cellm_source"] == res.source
    gates_toml = Path(cellm.__file__).parent / "gates.toml"
    assert m.gate_config_hash == hashlib.sha256(gates_toml.read_bytes()).hexdigest()
    assert m.verdict["passed"] is True and m.verdict["gate_class"] == "int8"
    assert {c["metric"] for c in m.verdict["checks"]} >= {"mean_kl", "top1_agreement", "ppl_ratio"}
    roles = {f.path: f.role for f in m.files}
    assert roles["tiny-int8.cellm"] == "cellm" and roles["tiny-int8.tokenizer.json"] == "tokenizer"
    assert roles["tiny-int8.NOTICE"] == "notice"
    assert "onnx/model.onnx" in roles and "onnx/genai_config.json" in roles
    assert m.file("tiny-int8.cellm").sha256 == res.sha256  # the converter's own hash agrees

    out = tmp_path / "pulled"
    reg.pull("tiny-gemma-int8", out)
    verify_dir(out)
    assert validate(out / "tiny-int8.cellm").ok
    assert (out / "onnx/model.onnx").read_bytes() == (onnx_dir / "model.onnx").read_bytes()


def test_cli_publish_checks_the_profiles_gate_class_from_an_eval_report(built, tmp_path, capsys):
    res, onnx_dir = built
    url = f"file://{tmp_path / 'reg'}"
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": BAD}))
    (tmp_path / "good.json").write_text(json.dumps({"metrics": GOOD}))
    base = ["publish", "--cellm", str(res.path), "--onnx", str(onnx_dir), "--registry", url]
    assert main([*base[:1], "tiny:1.0.0", *base[1:], "--eval", str(tmp_path / "bad.json")]) == 2
    assert "mean_kl" in capsys.readouterr().err
    assert main([*base[:1], "tiny:1.0.0", *base[1:], "--eval", str(tmp_path / "good.json")]) == 0
    capsys.readouterr()
    assert main(["show", "tiny:1.0.0", "--json", "--registry", url]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["verdict"]["gate_class"] == "int8" and m["metrics"] == GOOD and m["profile"] == "int8-v1"
