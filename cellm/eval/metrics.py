"""Metric arithmetic (pure numpy): log-softmax, top-K truncated KL, repetition, agreement.

KL(reference || candidate) from a cached top-K reference: the reference keeps, per position, its K
most likely tokens (indices + log-probs); the remaining probability mass forms one "tail" bucket.
We compute the KL between the two distributions coarse-grained onto those K+1 outcomes:

    KL_K = sum_{i in topK} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

By the log-sum inequality KL_K <= the exact KL, and the gap is bounded by the tail's internal
divergence weighted by p_tail (small when p_tail is small: report ``ref_tail_mass`` alongside).
``tests/test_eval_metrics.py`` checks it against the exact KL.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    # logits [N, V] -> log-probs [N, V] (float32; reductions in float64)
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x - m - lse


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices int32 [N, k] and log-probs float32 [N, k], most likely first."""
    k = min(int(k), logprobs.shape[-1])
    part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logprobs, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1)


def _tail(lp_top: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.exp(lp_top.astype(np.float64)).sum(axis=-1), 0.0, 1.0)


def kl_topk(ref_idx: np.ndarray, ref_lp: np.ndarray, cand_logprobs: np.ndarray) -> np.ndarray:
    """Coarse-grained KL(ref || cand) per position [N] (see the module docstring)."""
    p = np.exp(ref_lp.astype(np.float64))  # [N, K]
    lq = np.take_along_axis(cand_logprobs, ref_idx.astype(np.int64), axis=-1).astype(np.float64)  # [N, K]
    p_tail = _tail(ref_lp)
    q_tail = _tail(lq)
    kl = (p * (ref_lp.astype(np.float64) - lq)).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * (np.log(p_tail) - np.log(np.maximum(q_tail, 1e-30))), 0.0)
    return np.maximum(kl + tail, 0.0)


def kl_exact(ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> np.ndarray:
    p = np.exp(ref_logprobs.astype(np.float64))
    return (p * (ref_logprobs.astype(np.float64) - cand_logprobs.astype(np.float64))).sum(axis=-1)


def ngram_repetition(ids: list[int] | tuple[int, ...], n: int = 3) -> float:
    """Fraction of the n-grams of ``ids`` that repeat an earlier n-gram (0 = no repetition)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def agreement_length(a, b) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_degenerate(ids, text: str, n: int = 3, max_repetition: float = 0.5) -> bool:
    """Empty / whitespace-only output, or mostly repeated n-grams."""
    return len(ids) == 0 or not text.strip() or ngram_repetition(list(ids), n) > max_repetition


def percentile(x: np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(x, dtype=np.float64), q)) if len(x) else float("nan")
