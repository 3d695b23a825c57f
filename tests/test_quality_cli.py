"""`cellm quality sensitivity` / `allocate` end to end on the tiny checkpoint: the written profile
is valid, fits the budget (checked by Profile.plan's own byte arithmetic) and converts."""

from __future__ import annotations

import json

from cellm.cli import main
from cellm.profile import load_profile
from cellm.sources import open_source


def test_cli_sensitivity_allocate_convert(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cache"))
    src = str(tiny_ckpt)
    assert main(["quality", "sensitivity", src, "--json"]) == 0
    sens = json.loads(capsys.readouterr().out)
    assert sens["probe"] == "q4g32-gptq" and len(sens["kl"]) == 3 * 3 + 1
    assert list((tmp_path / "cache" / "quality").glob("*/sensitivity-*.json"))
    out = tmp_path / "alloc.toml"
    assert main(["quality", "allocate", src, "--budget", "0.55x-int8-v1", "-o", str(out), "--json"]) == 0
    summ = json.loads(capsys.readouterr().out)
    prof = load_profile(str(out))
    ck = open_source(src)
    shapes = {n: tuple(ck.shape(n)) for n in ck.tensor_names()}
    plan = prof.plan(shapes)
    budget = int(0.55 * load_profile("int8-v1").plan(shapes).total_bytes)
    assert plan.total_bytes == summ["total_bytes"] <= budget == summ["budget_bytes"]
    assert "Predicted mean KL" in out.read_text()
    fam = tmp_path / "fam.toml"
    assert main(["quality", "allocate", src, "--budget", "0.55x-int8-v1", "-o", str(fam),
                 "--granularity", "family"]) == 0
    assert load_profile(str(fam)).plan(shapes).total_bytes <= budget
    from cellm.convert import convert

    res = convert(src, str(out), tmp_path / "a.cellm")
    assert res.path.is_file()
