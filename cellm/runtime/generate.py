"""The generation loop: prefill, then one token per step, over any ``CausalLM``."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from cellm.errors import ModelRuntimeError, SamplingError
from cellm.runtime.sampling import Sampler, SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    stop_reason: str  # "eos" | "length" | "context"
    prefill_s: float
    decode_s: float

    @property
    def prefill_tps(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tps(self) -> float:
        # the first new token comes from the prefill logits; later ones each cost one decode step
        n = max(len(self.new_ids) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 and n else 0.0


def context_limit(model: Any) -> int:
    return int(getattr(model, "max_context", None) or model.config.max_position_embeddings)


def _accepts_last_only(model: Any) -> bool:
    import inspect

    try:
        return "last_only" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _last_logits(model: Any, ids: np.ndarray, state: Any) -> np.ndarray:
    if _accepts_last_only(model):  # skip the LM head for all but the last position
        return np.asarray(model.forward(ids, state, last_only=True))[-1]
    return np.asarray(model.forward(ids, state))[-1]


def generate_ids(
    model: Any,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    stop_ids: Optional[Sequence[int]] = None,
    on_token: Optional[Callable[[int], None]] = None,
) -> GenerationResult:
    """Greedy/sampled continuation of ``prompt_ids``; stops on ``stop_ids`` (default: config eos ids)."""
    if not isinstance(params, SamplingParams):
        raise SamplingError(f"params must be SamplingParams, got {type(params).__name__}")
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ModelRuntimeError("the prompt is empty (0 tokens); nothing to condition on")
    limit = context_limit(model)
    if len(prompt) > limit:
        raise ModelRuntimeError(f"prompt has {len(prompt)} tokens, longer than the context limit of {limit} tokens")
    stops = set(int(s) for s in (stop_ids if stop_ids is not None else model.config.eos_token_ids))
    sampler = Sampler(params)
    state = model.new_state()
    out: list[int] = []
    reason = "length"
    t0 = time.perf_counter()
    logits = _last_logits(model, np.asarray(prompt, dtype=np.int64), state)
    t1 = time.perf_counter()
    while len(out) < params.max_new_tokens:
        tok = sampler(logits)
        if tok in stops:
            reason = "eos"
            break
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) >= params.max_new_tokens:
            break
        if len(prompt) + len(out) >= limit:
            reason = "context"
            break
        logits = _last_logits(model, np.asarray([tok], dtype=np.int64), state)
    t2 = time.perf_counter()
    return GenerationResult(tuple(prompt), tuple(out), reason, t1 - t0, t2 - t1)


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    params: SamplingParams,
    *,
    chat: bool = False,
    on_text: Optional[Callable[[str], None]] = None,
) -> tuple[str, GenerationResult]:
    """Encode ``prompt`` (plain continuation with ``<bos>``, or the Gemma chat turn), generate, decode."""
    from cellm.runtime.tokenizer import IncrementalDecoder

    ids = tokenizer.chat(prompt) if chat else tokenizer.encode(prompt, add_bos=True)
    dec = IncrementalDecoder(tokenizer)
    pieces: list[str] = []

    def emit(tok: int) -> None:
        s = dec.push(tok)
        if s:
            pieces.append(s)
            if on_text is not None:
                on_text(s)

    res = generate_ids(model, ids, params, on_token=emit)
    tail = dec.flush()
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    return "".join(pieces), res
