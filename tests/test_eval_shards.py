"""Sharded evaluation (plan → shards → merge) gives exactly the unsharded numbers, through files too;
merge refuses incomplete or foreign shards; concurrent reference-cache writers never corrupt it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cellm.errors import EvalError
from cellm.eval import evaluate, evaluate_shard, merge_eval_shards, plan_eval_shards
from cellm.eval import reference as refmod
from cellm.eval.shards import EvalPlan, load_shard

CORPUS = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
          "def add(a, b):\n    return a + b\n- eggs\n- milk\n\"Hello,\" she said.\n") * 3
PROMPTS = "Once upon a time\nThe answer is\\n\ndef f(x):\nHello there\n# skip\n- eggs\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cellm.convert import convert
    from cellm.synthetic import make_checkpoint, tiny_config

    d = tmp_path_factory.mktemp("evshards")
    ck = make_checkpoint(d / "src", tiny_config(), seed=3)
    art = convert(str(ck), "int4-v1", out=d / "c-int4.cellm").path
    (d / "corpus.txt").write_text(CORPUS)
    (d / "prompts.txt").write_text(PROMPTS)
    return d, ck, art


def _kw(d, **over):
    kw = dict(corpus=d / "corpus.txt", prompts=d / "prompts.txt", window=24, top_k=64, gen_tokens=8,
              max_tokens=0, cache=d / "cache")
    kw.update(over)
    return kw


TIMING = ("reference_cached", "reference_seconds", "candidate_seconds", "total_seconds", "shards")


def _same(a, b):
    assert a.metrics == b.metrics  # exact float equality, every metric
    assert a.generations == b.generations
    assert a.candidate == b.candidate and a.reference == b.reference and a.gate_class == b.gate_class
    assert {k: v for k, v in a.settings.items() if k not in TIMING} == \
        {k: v for k, v in b.settings.items() if k not in TIMING}


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_equals_unsharded_in_process(setup, n):
    d, ck, art = setup
    one = evaluate(art, str(ck), **_kw(d))
    many = evaluate(art, str(ck), **_kw(d), shards=n)
    assert one.settings["shards"] == 1 and many.settings["shards"] == n
    assert one.settings["windows"] >= 4 and one.metrics["prompts"] == 5
    _same(one, many)
    # the generation checks are non-trivial on this model (some tokens generated, metrics defined)
    assert any(g["candidate_tokens"] > 0 for g in one.generations)


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_through_files_equals_unsharded(setup, tmp_path, n):
    d, ck, art = setup
    one = evaluate(art, str(ck), **_kw(d, gen_group=2))
    plan = plan_eval_shards(art, str(ck), n, **_kw(d, gen_group=2))
    assert len(plan.shards) == n and plan.reference_cached  # the unsharded run above left it in the cache
    # shards cover every window once, in order; generation groups spread over shards
    assert plan.shards[0].windows[0] == 0 and plan.shards[-1].windows[1] == len(plan.windows)
    assert all(a.windows[1] == b.windows[0] for a, b in zip(plan.shards, plan.shards[1:]))
    assert sorted(g for s in plan.shards for g in s.groups) == list(range(len(plan.groups))) == [0, 1, 2]
    assert sum(1 for s in plan.shards if s.groups) == min(n, 3)
    pfile = plan.save(tmp_path / "plan.json")
    assert EvalPlan.load(pfile) == plan
    files = [evaluate_shard(art, pfile, i, tmp_path / f"s{i}.npz") for i in reversed(range(n))]
    many = merge_eval_shards(pfile, files, str(ck))
    _same(one, many)
    # p99 from the shards' raw per-token values, computed independently here
    kl = np.concatenate([load_shard(tmp_path / f"s{i}.npz").kl for i in range(n)])
    assert len(kl) == one.metrics["tokens"]
    assert many.metrics["p99_kl"] == float(np.percentile(kl, 99)) and many.metrics["mean_kl"] == float(kl.mean())


def test_generation_groups_do_not_depend_on_shard_count(setup):
    d, ck, art = setup
    a = evaluate(art, str(ck), **_kw(d, gen_group=2))
    b = evaluate(art, str(ck), **_kw(d, gen_group=2), shards=3)
    _same(a, b)
    assert a.settings["gen_group"] == 2


def test_plan_defaults_are_evaluates_defaults(setup, tmp_path):
    from cellm.eval.evaluate import DEFAULT_GEN_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_TOP_K

    d, ck, art = setup
    kw = dict(corpus=d / "corpus.txt", prompts=d / "prompts.txt", cache=d / "cache")
    plan = plan_eval_shards(art, str(ck), 2, **kw)
    st = plan.settings
    assert (st["top_k"], st["gen_tokens"], st["max_tokens"]) == (DEFAULT_TOP_K, DEFAULT_GEN_TOKENS, DEFAULT_MAX_TOKENS)
    files = [evaluate_shard(art, plan, i, tmp_path / f"d{i}.npz") for i in range(2)]
    _same(evaluate(art, str(ck), **kw), merge_eval_shards(plan, files, str(ck)))


def test_merge_refuses_missing_duplicate_and_foreign_shards(setup, tmp_path):
    d, ck, art = setup
    plan = plan_eval_shards(art, str(ck), 2, **_kw(d))
    s0 = evaluate_shard(art, plan, 0, tmp_path / "a0.npz")
    s1 = evaluate_shard(art, plan, 1, tmp_path / "a1.npz")
    with pytest.raises(EvalError, match=r"\[1\] missing"):
        merge_eval_shards(plan, [s0], str(ck))
    with pytest.raises(EvalError, match="given twice"):
        merge_eval_shards(plan, [s0, s0, s1], str(ck))
    other = plan_eval_shards(art, str(ck), 2, **_kw(d, gen_tokens=5))
    f0 = evaluate_shard(art, other, 0, tmp_path / "b0.npz")
    with pytest.raises(EvalError, match="another plan"):
        merge_eval_shards(plan, [f0, s1], str(ck))
    with pytest.raises(EvalError, match="shard index 2"):
        evaluate_shard(art, plan, 2, tmp_path / "x.npz")
    with pytest.raises(EvalError, match=r"shards=0 must be an integer in \[1, 1024\]"):
        plan_eval_shards(art, str(ck), 0, **_kw(d))


def test_concurrent_plans_write_the_reference_cache_atomically(setup, tmp_path):
    d, ck, art = setup
    kw = _kw(d, cache=tmp_path / "cache", use_cache=False)  # each thread recomputes and writes the same key
    plans, errors = [], []

    def run():
        try:
            plans.append(plan_eval_shards(art, str(ck), 2, **kw))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=run) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{plans[0].key}.npz"]  # no temp left over
    stats = refmod.load(tmp_path / "cache", plans[0].key)
    assert stats is not None and len(stats.target_lp) == plans[0].positions
    files = [evaluate_shard(art, plans[0], i, tmp_path / f"c{i}.npz") for i in range(2)]
    _same(evaluate(art, str(ck), **_kw(d)), merge_eval_shards(plans[0], files, str(ck)))
