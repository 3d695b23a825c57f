"""Budgeted allocation: greedy convex-hull knapsack vs exhaustive search, budget parsing, and the
written profile is a valid profile whose plan bytes equal the allocation's bytes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cellm.errors import CellmError
from cellm.profile import parse_profile
from cellm.quality.allocate import allocate, parse_budget, profile_toml, write_profile
from cellm.quality.sensitivity import Sensitivity, scheme_bytes

CANDS = ("f16", "i8", "q4g32-gptq", "q4g128-gptq")


def _sens(shapes, seed=0):
    rng = np.random.default_rng(seed)
    kl, nb = {}, {}
    for n, shp in shapes.items():
        base = float(np.exp(rng.normal(-5, 1.5)))
        kl[n] = {"f16": 0.0, "i8": base * 0.01, "q4g32-gptq": base, "q4g128-gptq": base * 2.5}
        nb[n] = {s: scheme_bytes(n, shp, s) for s in CANDS}
    return Sensitivity(source_hash="x", candidates=CANDS, probe="q4g32-gptq", n_tokens=1, kl=kl,
                       measured={}, top1={}, err={}, nbytes=nb, fixed_bytes=1000)


SHAPES = {f"model.layers.{i}.mlp.{p}.weight": (64, 96) for i in range(2) for p in ("up_proj", "down_proj")}
SHAPES["model.embed_tokens.weight"] = (512, 64)


def _brute(sens, budget):
    names = sorted(sens.kl)
    best = None
    for combo in itertools.product(CANDS, repeat=len(names)):
        b = sens.fixed_bytes + sum(sens.nbytes[n][s] for n, s in zip(names, combo))
        if b > budget:
            continue
        k = sum(sens.kl[n][s] for n, s in zip(names, combo))
        if best is None or k < best:
            best = k
    return best


@pytest.mark.parametrize("frac", [0.3, 0.45, 0.6, 0.8])
def test_dp_matches_exhaustive_optimum(frac):
    sens = _sens(SHAPES, seed=int(frac * 10))
    full = sens.fixed_bytes + sum(v["f16"] for v in sens.nbytes.values())
    budget = int(full * frac)
    a = allocate(sens, budget)
    assert a.total_bytes <= budget
    assert a.total_bytes == sens.fixed_bytes + sum(sens.nbytes[t][s] for t, s in a.schemes.items())
    assert a.predicted_kl == pytest.approx(sum(sens.kl[t][s] for t, s in a.schemes.items()))
    opt = _brute(sens, budget)
    # exact DP (costs rounded up to budget/200000-byte steps): the exhaustive optimum, or within
    # the rounding slack of it
    assert opt - 1e-15 <= a.predicted_kl <= opt * 1.02 + 1e-15


def test_more_budget_never_worse_and_too_small_budget_raises():
    sens = _sens(SHAPES, seed=3)
    kls = [allocate(sens, b).predicted_kl for b in (60000, 80000, 120000, 400000)]
    assert all(x >= y - 1e-15 for x, y in zip(kls, kls[1:]))
    with pytest.raises(CellmError, match="smallest possible"):
        allocate(sens, 10)


def test_budget_parsing():
    shapes = {"model.layers.0.mlp.up_proj.weight": (64, 96), "model.norm.weight": (96,)}
    i8 = 64 * 96 + 64 * 2 + 96 * 2  # int8-v1: i8 + f16 row scales; norm f16
    assert parse_budget("0.5x-int8-v1", shapes) == int(0.5 * i8)
    assert parse_budget("240MB", shapes) == 240_000_000
    assert parse_budget("1000", shapes) == 1000
    assert parse_budget(1234, shapes) == 1234
    with pytest.raises(CellmError, match="budget"):
        parse_budget("half please", shapes)


def test_profile_round_trip(tmp_path):
    sens = _sens(SHAPES, seed=1)
    full = sens.fixed_bytes + sum(v["f16"] for v in sens.nbytes.values())
    a = allocate(sens, int(full * 0.5), budget_spec="0.5x-f16")
    text = profile_toml(a, sens, name="mixed-test")
    path = write_profile(tmp_path / "p.toml", text)
    prof = parse_profile(path.read_bytes(), str(path))
    assert prof.name == "mixed-test" and prof.gate_class == "int4"
    shapes = dict(SHAPES)
    shapes["model.norm.weight"] = (500,)  # 1000 fixed bytes as f16
    plan = prof.plan(shapes)
    assert plan.total_bytes == a.total_bytes
    assert {e.name: e.scheme for e in plan.entries if e.name in a.schemes} == a.schemes
    assert f"{a.predicted_kl:.5f}" in text


def test_family_granularity_profile_valid_for_other_sizes(tmp_path):
    from cellm.quality.allocate import by_family

    shapes = {f"model.layers.{i}.mlp.{p}.weight": (64, 96) for i in range(3) for p in ("up_proj", "down_proj")}
    shapes["model.embed_tokens.weight"] = (512, 64)
    sens = by_family(_sens(shapes, seed=2))
    assert len(sens.kl) == 3
    full = sens.fixed_bytes + sum(v["f16"] for v in sens.nbytes.values())
    a = allocate(sens, int(full * 0.5))
    text = profile_toml(a, sens, name="fam", patterns=True)
    prof = parse_profile(text.encode(), "fam")
    # the same profile plans a checkpoint with a different number of layers
    other = {f"model.layers.{i}.mlp.{p}.weight": (64, 96) for i in range(5) for p in ("up_proj", "down_proj")}
    other["model.embed_tokens.weight"] = (512, 64)
    other["model.norm.weight"] = (64,)
    plan = prof.plan(other)
    for e in plan.entries:
        if e.name != "model.norm.weight":
            fam = [f for f in a.schemes if __import__("re").fullmatch(f, e.name)]
            assert e.scheme == a.schemes[fam[0]]


def test_big_item_case_where_a_ratio_greedy_fails():
    # one big unit whose upgrade is worth more than all the small upgrades together
    kl = {"big": {"i8": 0.004, "q4g32-gptq": 0.036}}
    nb = {"big": {"i8": 168, "q4g32-gptq": 97}}
    for i in range(10):
        kl[f"s{i}"] = {"i8": 0.0002, "q4g32-gptq": 0.003}
        nb[f"s{i}"] = {"i8": 10, "q4g32-gptq": 6}
    sens = Sensitivity(source_hash="x", candidates=("i8", "q4g32-gptq"), probe="q4g32-gptq", n_tokens=1,
                       kl=kl, measured={}, top1={}, err={}, nbytes=nb, fixed_bytes=0)
    a = allocate(sens, 240)
    assert a.schemes["big"] == "i8" and a.total_bytes <= 240
    assert a.predicted_kl == pytest.approx(_brute_generic(sens, 240))


def _brute_generic(sens, budget):
    names = sorted(sens.kl)
    best = None
    for combo in itertools.product(sens.candidates, repeat=len(names)):
        b = sens.fixed_bytes + sum(sens.nbytes[n][s] for n, s in zip(names, combo))
        if b <= budget:
            k = sum(sens.kl[n][s] for n, s in zip(names, combo))
            best = k if best is None or k < best else best
    return best
