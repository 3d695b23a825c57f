"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from cellm.errors import SamplingError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        def num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        if not num(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise SamplingError(f"seed={self.seed!r} must be a non-negative integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Stateful (seeded RNG) token picker for one generation."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        # logits float32 [V] -> token id
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if p.greedy:
            return int(np.argmax(logits))
        cand = np.arange(logits.shape[0])
        vals = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < vals.shape[0]:
            part = np.argpartition(-vals, p.top_k - 1)[: p.top_k]
            cand, vals = cand[part], vals[part]
        order = np.argsort(-vals, kind="stable")
        cand, vals = cand[order], vals[order]
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)  # smallest prefix with mass >= top_p
            cand, probs = cand[:keep], probs[:keep] / probs[:keep].sum()
        return int(cand[self.rng.choice(len(cand), p=probs)])
