"""Profiles: shipped recipes select exactly the upstream tensor sets; rule errors are reported."""

from __future__ import annotations

import math

import pytest

from cellm.errors import ProfileError
from cellm.names import expected_tensors
from cellm.profile import list_profiles, load_profile, parse_profile
from cellm.synthetic import gemma3_270m_config, tiny_config

SHIPPED = ["f16", "int4-v1", "int8-v1", "mixed-int4", "mixed-int4-v1",
           "int4-g32-gptq-sym", "int4-g64-gptq-sym", "int4-g128-gptq-sym"]


def _is_layer(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit()


def expected_recipe(profile: str, shapes: dict) -> dict[str, str]:
    """The notes' recipes, written independently of the TOML rules (plain string tests)."""
    out = {}
    for name, shape in shapes.items():
        two_d_weight = len(shape) == 2 and name.endswith(".weight")
        attn = ".self_attn." in name
        mlp = ".mlp." in name
        s = "f16"
        if profile == "int8-v1" and two_d_weight and _is_layer(name) and (attn or mlp):
            s = "i8"
        elif profile == "mixed-int4-v1" and two_d_weight and _is_layer(name) and mlp:
            s = "i4"
        elif profile == "mixed-int4" and two_d_weight and _is_layer(name) and mlp:
            s = "q4g32"
        elif profile == "int4-v1" and two_d_weight and (
            (_is_layer(name) and (attn or mlp)) or "embed_tokens" in name
        ):
            s = "i4"
        elif profile.endswith("-gptq-sym") and two_d_weight and (
            (_is_layer(name) and (attn or mlp)) or "embed_tokens" in name
        ):
            s = f"q4g{profile.split('-')[1][1:]}-gptq-sym"  # int4-g64-gptq-sym -> q4g64-gptq-sym
        out[name] = s
    return out


def test_shipped_profiles_listed():
    assert set(SHIPPED) <= set(list_profiles())


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("cfg", [tiny_config(), gemma3_270m_config()], ids=["tiny", "270m"])
def test_selection_matches_recipe(name, cfg):
    shapes = expected_tensors(cfg)
    prof = load_profile(name)
    assert prof.name == name
    plan = prof.plan(shapes)
    assert plan.schemes == expected_recipe(name, shapes)
    # q_norm / k_norm are 1-D .self_attn. weights: never quantized
    assert plan.schemes["model.layers.0.self_attn.q_norm.weight"] == "f16"
    assert [e.name for e in plan.entries] == sorted(shapes)


def _ref_bytes(scheme: str, shape) -> int:
    """Independent byte arithmetic: v1 formulas from the notes, q4g from the MatMulNBits layout."""
    if scheme == "f16":
        return 2 * math.prod(shape)
    rows, cols = shape
    if scheme == "i8":
        return rows * cols + 2 * rows
    if scheme == "i4":
        return rows * ((cols + 1) // 2) + 2 * rows
    if scheme.startswith("q4g"):
        block = int(scheme[3:].split("-")[0])
        nb = -(-cols // block)
        zeros = 0 if scheme.endswith("-sym") else rows * ((nb + 1) // 2)
        return rows * nb * block // 2 + 2 * rows * nb + zeros
    raise AssertionError(scheme)


@pytest.mark.parametrize("name", SHIPPED)
def test_plan_bytes(name):
    shapes = expected_tensors(gemma3_270m_config())
    plan = load_profile(name).plan(shapes)
    want = expected_recipe(name, shapes)
    per = {}
    for n, shape in shapes.items():
        per[want[n]] = per.get(want[n], 0) + _ref_bytes(want[n], shape)
    assert plan.bytes_per_scheme == per
    assert plan.total_bytes == sum(per.values())


def test_plan_sizes_match_notes_for_1b():
    """The notes: Gemma-3-1B-it int8 ~ 1.2 GB, mixed ~ 1.0 GB, int4 ~ 481 MB (binary units)."""
    from cellm.synthetic import gemma3_1b_config

    shapes = expected_tensors(gemma3_1b_config())
    tot = {n: load_profile(n).plan(shapes).total_bytes for n in ("int8-v1", "mixed-int4-v1", "int4-v1")}
    gib, mib = 2**30, 2**20
    assert 1.15 * gib < tot["int8-v1"] < 1.25 * gib
    assert 0.95 * gib < tot["mixed-int4-v1"] < 1.05 * gib
    assert 470 * mib < tot["int4-v1"] < 490 * mib


def test_content_hash_stable_and_line_ending_canonical():
    p = load_profile("int8-v1")
    data = open(p.path, "rb").read()
    assert parse_profile(data).content_hash == p.content_hash
    assert parse_profile(data.replace(b"\n", b"\r\n")).content_hash == p.content_hash
    assert load_profile("int4-v1").content_hash != p.content_hash


def test_load_by_path(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\ngate_class = "f16"\n[[rules]]\npattern = ".*"\nscheme = "f16"\n')
    assert load_profile(f).name == "mine"
    assert load_profile(str(f)).rules[0].scheme == "f16"


def _prof(body: str):
    return parse_profile(('name = "t"\ngate_class = "int4"\n' + body).encode(), "t.toml")


SHAPES = expected_tensors(tiny_config())


def test_rule_matching_nothing():
    p = _prof(
        '[[rules]]\npattern = \'.*\\.mlp\\..*\'\nndim = 2\nscheme = "i4"\n'
        '[[rules]]\npattern = \'lm_head\\.weight\'\nscheme = "i4"\n'
        '[[rules]]\npattern = ".*"\nscheme = "f16"\n'
    )
    with pytest.raises(ProfileError, match=r"rule 2 pattern 'lm_head\\\\.weight'.*matched nothing"):
        p.plan(SHAPES)


def test_uncovered_2d_weight():
    p = _prof('[[rules]]\npattern = \'.*norm\\.weight\'\nscheme = "f16"\n')
    with pytest.raises(ProfileError, match=r"2-D weight.*covered by no rule.*embed_tokens"):
        p.plan(SHAPES)


def test_unknown_scheme():
    with pytest.raises(ProfileError, match=r"rule 1 uses unknown scheme 'i3'"):
        _prof('[[rules]]\npattern = ".*"\nscheme = "i3"\n')


def test_quantized_scheme_on_1d_tensor():
    p = _prof('[[rules]]\npattern = \'.*self_attn.*\'\nscheme = "i4"\n[[rules]]\npattern = ".*"\nscheme = "f16"\n')
    with pytest.raises(ProfileError, match=r"1-D tensor model\.layers\.0\.self_attn\.k_norm\.weight"):
        p.plan(SHAPES)


def test_bad_toml_names_file_and_line(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text('name = "x"\ngate_class = "int4"\n[[rules]]\npattern = ".*\nscheme = "f16"\n')
    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML: .*line 4"):
        load_profile(f)


@pytest.mark.parametrize(
    "body, msg",
    [
        ('[[rules]]\npattern = "(" \nscheme = "f16"\n', "not a valid regex"),
        ('[[rules]]\npattern = ".*"\nscheme = "f16"\nbogus = 1\n', "unknown key"),
        ('[[rules]]\npattern = ".*"\nscheme = "f16"\nndim = 0\n', "ndim=0"),
        ("", "at least one"),
    ],
)
def test_bad_rules(body, msg):
    with pytest.raises(ProfileError, match=msg):
        _prof(body)


def test_bad_gate_class():
    with pytest.raises(ProfileError, match="gate_class"):
        parse_profile(b'name = "x"\ngate_class = "int2"\n[[rules]]\npattern = ".*"\nscheme = "f16"\n')


def test_unknown_profile_name():
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*int8-v1"):
        load_profile("nope")


def test_exact_name_rules_express_per_tensor_allocation():
    p = _prof(
        "[[rules]]\npattern = 'model\\.layers\\.1\\.mlp\\.down_proj\\.weight'\nscheme = \"q4g32-sym\"\n"
        "[[rules]]\npattern = '.*\\.mlp\\..*'\nndim = 2\nscheme = \"q4g64\"\n"
        "[[rules]]\npattern = '.*'\nscheme = \"f16\"\n"
    )
    s = p.plan(SHAPES).schemes
    assert s["model.layers.1.mlp.down_proj.weight"] == "q4g32-sym"
    assert s["model.layers.0.mlp.down_proj.weight"] == "q4g64"
    assert s["model.layers.1.self_attn.q_proj.weight"] == "f16"


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_plans_both_sizes(name):
    """Any profile file added under cellm/profiles/ must cover the real Gemma-3 tensor sets."""
    from cellm.synthetic import gemma3_1b_config

    prof = load_profile(name)
    assert prof.name == name  # file stem == profile name
    for cfg in (gemma3_270m_config(), gemma3_1b_config()):
        plan = prof.plan(expected_tensors(cfg))
        assert plan.total_bytes > 0
        for e in plan.entries:
            if len(e.shape) == 1:
                assert e.scheme == "f16", e.name
