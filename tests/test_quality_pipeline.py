"""Quality pipeline on a tiny synthetic Gemma-3: the batched engine against the runtime, calibration
statistics against the runtime's on_linear_input hook, measured KL against a direct computation,
sensitivity caching and the text disjointness of calibration vs eval corpus."""

from __future__ import annotations

import re
from importlib import resources

import numpy as np
import pytest

from cellm.quality import calibration as C
from cellm.quality.engine import EMBED, Engine, Reference
from cellm.quality.sensitivity import Sensitivity, fake_quant, measure, spearman, validate


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def test_calibration_text_disjoint_from_eval_corpus():
    data = resources.files("cellm") / "data"
    cal = _words((data / "calibration.txt").read_text(encoding="utf-8"))
    ev = _words((data / "eval_corpus.txt").read_text(encoding="utf-8"))
    assert len(cal) > 2000
    grams = lambda w: {tuple(w[i:i + 8]) for i in range(len(w) - 7)}  # noqa: E731
    shared = grams(cal) & grams(ev)
    assert not shared, f"calibration text shares 8-grams with the eval corpus: {sorted(shared)[:3]}"


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    from cellm.sources import open_source

    ck = open_source(str(tiny_ckpt))
    w = C.load_weights(ck)
    return ck, w, Engine(ck.config, w)


def _runtime_logits(cfg, weights, ids):
    from cellm.runtime.model import GemmaModel
    from cellm.runtime.weights import DenseWeights

    m = GemmaModel(DenseWeights(cfg, weights))
    return m.forward(np.asarray(ids, dtype=np.int64), m.new_state())


def _ids(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, cfg.vocab_size, size=(b, t))
    ids[:, 0] = 2
    return ids


def test_engine_matches_runtime_batched(tiny):
    ck, w, eng = tiny
    ids = _ids(ck.config, 3, 20)  # longer than the tiny sliding window (8)
    final = eng.hidden(ids)
    for b in range(3):
        ref = _runtime_logits(ck.config, w, ids[b])
        np.testing.assert_allclose(final[b] @ w[EMBED].T, ref, rtol=2e-4, atol=2e-4)


def test_calibration_stats_match_runtime_hook(tiny):
    ck, w, eng = tiny
    ids = _ids(ck.config, 2, 16, seed=1)
    st = C.collect(eng, ids, batch=1)
    acc = {}

    def hook(name, x):
        x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        acc[name] = acc.get(name, 0) + x2.T @ x2

    from cellm.runtime.model import GemmaModel
    from cellm.runtime.weights import DenseWeights

    m = GemmaModel(DenseWeights(ck.config, w))
    for b in range(2):
        m.forward(ids[b], m.new_state(), on_linear_input=hook)
    n = ids.size
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.2.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight", EMBED):
        np.testing.assert_allclose(st.hessian(name), acc[name] / n, rtol=1e-3, atol=1e-5)
    assert st.n_tokens == n


def _kl_direct(p_logits, q_logits):
    def lsm(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = lsm(p_logits), lsm(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()), float((lp.argmax(-1) == lq.argmax(-1)).mean())


def test_measured_kl_equals_direct_computation(tiny):
    ck, w, eng = tiny
    ids = _ids(ck.config, 2, 12, seed=2)
    ref = Reference(eng, ids)
    st = C.collect(eng, ids)
    name = "model.layers.1.mlp.down_proj.weight"
    dq = fake_quant(name, w[name], "q4g32-gptq", st)
    dq_e = fake_quant(EMBED, w[EMBED], "q4g32", None)
    for ov in ({name: dq}, {EMBED: dq_e}, {name: dq, EMBED: dq_e}):
        kl, top = ref.measure(ov)
        w2 = dict(w, **ov)
        p = np.concatenate([_runtime_logits(ck.config, w, ids[b]) for b in range(2)])
        q = np.concatenate([_runtime_logits(ck.config, w2, ids[b]) for b in range(2)])
        kd, td = _kl_direct(p, q)
        assert kl == pytest.approx(kd, rel=1e-2, abs=1e-7)
        assert top == pytest.approx(td)
        assert kl > 0


def test_sensitivity_measure_cache_and_validate(tiny, tmp_path):
    ck, w, eng = tiny
    ids = _ids(ck.config, 2, 12, seed=3)
    ref = Reference(eng, ids)
    st = C.collect(eng, ids)
    cands = ("f16", "i8", "q4g32-gptq", "q4g32")
    sens = measure(eng, ref, st, candidates=cands, probe="q4g32-gptq", source_hash=ck.content_hash,
                   granularity="tensor")
    two_d = sorted(n for n, a in w.items() if a.ndim == 2)
    assert sorted(sens.kl) == two_d
    for t in two_d:
        assert sens.kl[t]["f16"] == 0.0
        assert sens.kl[t]["q4g32-gptq"] == pytest.approx(max(sens.measured[t]["q4g32-gptq"], 0))
        assert sens.kl[t]["i8"] < sens.kl[t]["q4g32-gptq"]
    assert sens.fixed_bytes == sum(a.size * 2 for a in w.values() if a.ndim == 1)
    p = tmp_path / "s.json"
    sens.save(p)
    back = Sensitivity.load(p)
    assert back.kl == sens.kl and back.nbytes == sens.nbytes and back.candidates == sens.candidates
    val = validate(eng, ref, st, sens, [(t, "q4g32") for t in two_d[:6]])
    assert -1.0 <= val["spearman"] <= 1.0 and len(val["pairs"]) == 6
    # block granularity: attention / gate+up / down per layer, plus the embedding
    blk = measure(eng, ref, st, candidates=("f16", "i8", "q4g32-gptq"), granularity="block")
    n_layers = ck.config.num_hidden_layers
    assert len(blk.kl) == 3 * n_layers + 1
    assert sorted(blk.tensors_of("model.layers.0.self_attn")) == sorted(
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo")
    assert sorted(t for u in blk.kl for t in blk.tensors_of(u)) == two_d
    assert sum(v["f16"] for v in blk.nbytes.values()) + blk.fixed_bytes == sum(a.size * 2 for a in w.values())


def test_spearman_independent():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random(30), rng.random(30)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_sharded_measurement_merges_to_the_full_result(tiny):
    from cellm.quality.sensitivity import merge, quantizable, unit_of

    ck, w, eng = tiny
    ids = _ids(ck.config, 1, 12, seed=4)
    ref = Reference(eng, ids)
    st = C.collect(eng, ids)
    cands = ("f16", "i8", "q4g32-gptq")
    full = measure(eng, ref, st, candidates=cands)
    units = sorted({unit_of(n) for n in quantizable(w)})
    parts = []
    for i in range(2):
        mine = set(units[i::2])
        parts.append(measure(eng, ref, st, candidates=cands,
                             tensors=[n for n in quantizable(w) if unit_of(n) in mine]))
    merged = merge(parts, w)
    assert merged.kl == full.kl and merged.nbytes == full.nbytes and merged.members == full.members
    assert merged.fixed_bytes == full.fixed_bytes


def test_extending_candidates_equals_measuring_them(tiny):
    """Adding candidate schemes to cached measurements (no probe re-measurement) gives exactly what
    measuring with all candidates gives; the embedding's candidates are measured, not predicted."""
    from cellm.quality.sensitivity import extend

    ck, w, eng = tiny
    ids = _ids(ck.config, 1, 12, seed=5)
    ref = Reference(eng, ids)
    st = C.collect(eng, ids)
    full = measure(eng, ref, st, candidates=("f16", "i8", "q4g32-gptq", "q6g32"))
    small = measure(eng, ref, st, candidates=("f16", "i8", "q4g32-gptq"))
    grown = extend(small, eng, ref, st, ("f16", "i8", "q4g32-gptq", "q6g32"))
    assert grown.candidates == full.candidates
    assert grown.kl == full.kl and grown.err == full.err and grown.nbytes == full.nbytes
    assert grown.measured == full.measured
    assert set(full.measured[EMBED]) == {"q4g32-gptq", "i8", "q6g32"}
    kl_direct, _ = ref.measure({EMBED: fake_quant(EMBED, w[EMBED], "q6g32", st)})
    assert full.kl[EMBED]["q6g32"] == pytest.approx(max(kl_direct, 0.0), rel=1e-12, abs=1e-15)
    # a measurement made before the embedding was measured directly gets its i8 measured on load
    legacy = measure(eng, ref, st, candidates=("f16", "i8", "q4g32-gptq"))
    for f in ("measured", "top1"):
        getattr(legacy, f)[EMBED] = {"q4g32-gptq": getattr(legacy, f)[EMBED]["q4g32-gptq"]}
    legacy.kl[EMBED]["i8"] = 123.0
    extend(legacy, eng, ref, st, legacy.candidates)
    assert legacy.kl[EMBED]["i8"] == small.kl[EMBED]["i8"]
