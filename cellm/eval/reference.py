"""The reference side of an evaluation, computed once per (source, corpus, prompts, settings) and cached.

Cached per scored position: the reference's top-K token ids and log-probs (K = ``top_k``, default
256), and the log-prob of the actual next token; per prompt: the reference's greedy continuation.
File: ``$CELLM_CACHE/eval/<key>.npz`` (default ``~/.cache/cellm/eval``), written atomically; the key
hashes the source identity (checkpoint content hash or artifact sha256), the corpus and prompt
bytes, the settings and ``cellm.runtime.RUNTIME_VERSION``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cellm.atomic import atomic_write
from cellm.eval.metrics import top_k
from cellm.eval.runner import Progress, greedy_batch, teacher_forced


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    top_idx: np.ndarray  # int32 [N, K]
    top_lp: np.ndarray  # float32 [N, K]
    target_lp: np.ndarray  # float32 [N]
    generations: tuple[tuple[int, ...], ...]
    key: str


def cache_dir(override: Optional[str | os.PathLike] = None) -> Path:
    if override is not None:
        return Path(override)
    from cellm.sources.cache import cache_root

    return cache_root() / "eval"


def cache_key(**parts: Any) -> str:
    from cellm.runtime import RUNTIME_VERSION

    blob = json.dumps({**parts, "runtime": RUNTIME_VERSION}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def compute(model: Any, windows: Sequence[np.ndarray], prompts: Sequence[Sequence[int]], *, k: int,
            gen_tokens: int, stop_ids: Sequence[int], key: str, progress: Progress = None) -> ReferenceStats:
    idx, lps, tl = [], [], []

    def consume(lp: np.ndarray, tgt: np.ndarray) -> None:
        i, v = top_k(lp, k)
        idx.append(i)
        lps.append(v.astype(np.float32))
        tl.append(np.take_along_axis(lp, tgt[:, None], -1)[:, 0].astype(np.float32))

    teacher_forced(model, windows, consume, progress, stage="reference teacher-forced")
    gens = greedy_batch(model, prompts, gen_tokens, stop_ids, progress)
    return ReferenceStats(np.concatenate(idx), np.concatenate(lps), np.concatenate(tl), tuple(gens), key)


def save(stats: ReferenceStats, directory: Path) -> Path:
    """Write ``<directory>/<key>.npz`` atomically (unique temp file + fsync + rename): concurrent
    writers of the same key (threads or processes) each replace it with a complete, equal file."""
    gen_lens = np.asarray([len(g) for g in stats.generations], dtype=np.int64)
    gen_flat = np.asarray([t for g in stats.generations for t in g], dtype=np.int64)
    return atomic_write(Path(directory) / f"{stats.key}.npz",
                        lambda f: np.savez(f, top_idx=stats.top_idx, top_lp=stats.top_lp, target_lp=stats.target_lp,
                                           gen_lens=gen_lens, gen_flat=gen_flat))


def load(directory: Path, key: str) -> Optional[ReferenceStats]:
    path = directory / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            lens, flat = z["gen_lens"], z["gen_flat"]
            offs = np.concatenate([[0], np.cumsum(lens)])
            gens = tuple(tuple(int(t) for t in flat[offs[i] : offs[i + 1]]) for i in range(len(lens)))
            return ReferenceStats(z["top_idx"], z["top_lp"], z["target_lp"], gens, key)
    except (OSError, KeyError, ValueError):
        return None  # unreadable cache entry: recompute (and overwrite)
