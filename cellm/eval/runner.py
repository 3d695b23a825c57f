"""Running a model over the eval data: teacher-forced windows and lock-step greedy continuations."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from cellm.eval.metrics import log_softmax

ROW_CHUNK = 128  # positions per LM-head block (bounds the [rows, vocab] temporaries to ~130 MB each)
Progress = Optional[Callable[[str, int, int], None]]


def teacher_forced(model: Any, windows: Sequence[np.ndarray], consume: Callable[[np.ndarray, np.ndarray], None],
                   progress: Progress = None, stage: str = "teacher-forced") -> None:
    """For every window, feed ``win[:-1]`` and call ``consume(logprobs [c, V], targets [c])`` per block."""
    total = sum(len(w) - 1 for w in windows)
    done = 0
    for win in windows:
        if len(win) < 2:
            continue
        inp, tgt = win[:-1], win[1:]
        state = model.new_state()
        if hasattr(model, "hidden"):
            h = model.hidden(inp, state)  # [T, H]
            for a in range(0, len(inp), ROW_CHUNK):
                consume(log_softmax(model.logits(h[a : a + ROW_CHUNK])), tgt[a : a + ROW_CHUNK])
        else:
            logits = np.asarray(model.forward(inp, state), dtype=np.float32)
            for a in range(0, len(inp), ROW_CHUNK):
                consume(log_softmax(logits[a : a + ROW_CHUNK]), tgt[a : a + ROW_CHUNK])
        done += len(inp)
        if progress is not None:
            progress(stage, done, total)


def greedy_batch(model: Any, prompts: Sequence[Sequence[int]], max_new: int, stop_ids: Sequence[int],
                 progress: Progress = None) -> list[tuple[int, ...]]:
    """Greedy continuations of every prompt, stepped in lock-step so the LM head runs once per step
    for all prompts (one GEMM instead of one GEMV per prompt)."""
    from cellm.runtime.generate import generate_ids
    from cellm.runtime.sampling import SamplingParams

    if not hasattr(model, "hidden_batch"):
        return [generate_ids(model, p, SamplingParams(max_new_tokens=max_new), stop_ids=stop_ids).new_ids
                for p in prompts]
    stops = set(int(s) for s in stop_ids)
    states = [model.new_state() for _ in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    last: dict[int, int] = {}
    for step in range(max_new):
        if not live:
            break
        if step == 0:  # prefill each prompt (GEMMs), then batch the new tokens of all prompts
            hs = np.concatenate([model.hidden(np.asarray(prompts[i], dtype=np.int64), states[i])[-1:] for i in live])
        else:
            hs = model.hidden_batch(np.asarray([last[i] for i in live]), [states[i] for i in live])  # [n_live, H]
        nxt = np.argmax(model.logits(hs), axis=-1)
        still = []
        for i, tok in zip(live, nxt.tolist()):
            if tok in stops:
                continue
            outs[i].append(int(tok))
            last[i] = int(tok)
            still.append(i)
        live = still
        if progress is not None:
            progress("generate", step + 1, max_new)
    return [tuple(o) for o in outs]
