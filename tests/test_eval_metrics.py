"""Metric arithmetic against independent computations (torch / explicit formulas)."""

from __future__ import annotations

import numpy as np
import torch

from cellm.eval import metrics


def _peaked_logits(rng, n, v, temp):
    return (rng.standard_normal((n, v)) * temp).astype(np.float32)


def test_log_softmax_matches_torch():
    x = _peaked_logits(np.random.default_rng(0), 7, 1000, 5.0)
    ref = torch.log_softmax(torch.from_numpy(x).double(), -1).numpy()
    np.testing.assert_allclose(metrics.log_softmax(x), ref, atol=2e-5)


def test_topk_kl_equals_exact_when_k_covers_vocab_and_is_a_tight_lower_bound():
    rng = np.random.default_rng(1)
    ref = metrics.log_softmax(_peaked_logits(rng, 50, 400, 4.0))
    cand = metrics.log_softmax(np.log(np.exp(ref) + 1e-3) + rng.normal(0, 0.3, ref.shape).astype(np.float32))
    exact = metrics.kl_exact(ref, cand)
    # explicit formula, independent of the module
    p = np.exp(ref.astype(np.float64))
    assert np.allclose(exact, (p * (ref - cand)).sum(-1))
    idx, lp = metrics.top_k(ref, 400)
    np.testing.assert_allclose(metrics.kl_topk(idx, lp, cand), exact, rtol=1e-4, atol=1e-6)
    for k in (8, 32, 128):
        idx, lp = metrics.top_k(ref, k)
        approx = metrics.kl_topk(idx, lp, cand)
        assert (approx <= exact + 1e-6).all()  # log-sum inequality
    idx, lp = metrics.top_k(ref, 128)  # peaked distributions: top-128 of 400 holds nearly all the mass
    assert np.abs(metrics.kl_topk(idx, lp, cand) - exact).mean() < 0.02 * exact.mean() + 1e-4


def test_top_k_sorted_and_correct():
    lp = metrics.log_softmax(_peaked_logits(np.random.default_rng(2), 5, 300, 3.0))
    idx, vals = metrics.top_k(lp, 10)
    for r in range(5):
        want = np.argsort(-lp[r], kind="stable")[:10]
        assert set(idx[r]) == set(want)
        assert (np.diff(vals[r]) <= 0).all()
        np.testing.assert_array_equal(vals[r], lp[r, idx[r]])


def test_repetition_agreement_degenerate():
    assert metrics.ngram_repetition([1, 2, 3, 4, 5], 3) == 0.0
    assert metrics.ngram_repetition([7] * 10, 3) == 1 - 1 / 8
    assert metrics.ngram_repetition([1, 2, 3, 1, 2, 3], 3) == 1 - 3 / 4
    assert metrics.agreement_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert metrics.agreement_length([], [1]) == 0
    assert metrics.is_degenerate([], "")
    assert metrics.is_degenerate([5, 6], "  \n")
    assert metrics.is_degenerate([9] * 20, "aaaaaaaaaa")
    assert not metrics.is_degenerate([1, 2, 3, 4, 5, 6], "a fine sentence")
