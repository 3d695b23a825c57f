"""Quality work: calibration statistics, measured sensitivity, budgeted mixed-precision allocation.

Pipeline (all cached per source content hash under ``$CELLM_CACHE/quality/``)::

    sess = open_session("gemma-3-270m")                 # weights, calibration X^T X, reference run
    sens = sensitivity(sess)                            # per-tensor KL (measured probe + H-ratio)
    alloc = allocate_budget(sess, sens, "0.55x-int8-v1")
    text = profile_toml(alloc, sens)                    # an ordinary profile file

Modules: ``engine`` (batched, layer-resumable float32 forward), ``calibration``, ``sensitivity``,
``allocate``, ``build`` (conversion with calibration-aware schemes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from cellm.quality.allocate import Allocation, allocate, parse_budget, profile_toml, write_profile
from cellm.quality.calibration import (
    CalibrationStats,
    calibration_stats,
    calibration_text,
    load_weights,
    tokenize_windows,
)
from cellm.quality.engine import Engine, Reference
from cellm.quality.sensitivity import (
    DEFAULT_CANDIDATES,
    DEFAULT_PROBE,
    Sensitivity,
    measure,
    sensitivity_key,
    sensitivity_path,
)

# the candidate list of the first cache layout (its files are found, then extended)
LEGACY_CANDIDATES = ("f16", "i8", "q4g32-gptq")
# sensitivity is measured on calibration windows (never on the eval corpus)
SENS_WINDOWS = 2
SENS_WINDOW = 256


@dataclasses.dataclass
class Session:
    ckpt: Any
    engine: Engine
    stats: CalibrationStats
    ids: np.ndarray  # sensitivity windows
    cache_dir: Any = None
    _ref: Reference | None = None

    @property
    def ref(self) -> Reference:
        if self._ref is None:
            self._ref = Reference(self.engine, self.ids)
        return self._ref

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(a.shape) for n, a in self.engine.w.items()}


def open_session(source: Any, *, cache_dir=None, windows: int = SENS_WINDOWS,
                 window: int = SENS_WINDOW) -> Session:
    """Load a source (spec or Checkpoint), its weights (f32) and calibration statistics."""
    if isinstance(source, (str, os.PathLike)):
        from cellm.sources import open_source

        source = open_source(str(source))
    engine = Engine(source.config, load_weights(source))
    stats = calibration_stats(source, engine, cache_dir=cache_dir)
    # sensitivity windows: the LAST windows of the calibration text
    all_ids = tokenize_windows(source.tokenizer_json, calibration_text(), window)
    ids = all_ids[-windows:]
    return Session(ckpt=source, engine=engine, stats=stats, ids=ids, cache_dir=cache_dir)


def sensitivity(sess: Session, *, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                probe: str = DEFAULT_PROBE, use_cache: bool = True, granularity: str = "block",
                shard: tuple[int, int] | None = None,
                progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Per-unit sensitivity of a session's source (cached).

    ``shard=(i, n)`` measures only every n-th unit starting at i and saves a part file; separate
    processes can measure the parts in parallel, and a later call without ``shard`` merges them
    (the merged result is identical to a single run: units are measured independently)."""
    from cellm.quality.sensitivity import MEASURED_UNITS, extend, merge, quantizable, unit_of

    h = sess.ckpt.content_hash
    key = sensitivity_key(h, None, probe, sess.ids, sess.stats.key, granularity)
    path = sensitivity_path(h, key, sess.cache_dir)

    def finish(sens: Sensitivity, dirty: bool) -> Sensitivity:
        """Grow a cached measurement to the requested candidates (no probe re-measurement)."""
        stale = any(c not in ("f16", sens.probe) and c not in sens.measured.get(u, {})
                    for u in MEASURED_UNITS if u in sens.kl for c in sens.candidates)
        if stale or any(c not in sens.candidates for c in candidates):
            extend(sens, sess.engine, sess.ref, sess.stats, candidates, progress=progress)
            dirty = True
        if dirty and use_cache:
            sens.save(path)
        return sens

    if use_cache:
        for cand in (path, sensitivity_path(h, sensitivity_key(h, LEGACY_CANDIDATES, probe, sess.ids,
                                                               sess.stats.key, granularity), sess.cache_dir)):
            if cand.is_file():
                try:
                    return finish(Sensitivity.load(cand), dirty=cand != path)
                except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
                    pass
    units = sorted({unit_of(n, granularity) for n in quantizable(sess.engine.w)})
    if shard is not None:
        i, n = shard
        mine = set(units[i::n])
        part = path.with_name(path.stem + f".part{i}of{n}.json")
        if use_cache and part.is_file():
            return Sensitivity.load(part)
        names = [t for t in quantizable(sess.engine.w) if unit_of(t, granularity) in mine]
        sens = measure(sess.engine, sess.ref, sess.stats, candidates=candidates, probe=probe,
                       tensors=names, source_hash=h, granularity=granularity, progress=progress)
        sens.save(part)
        return sens
    if use_cache:
        for n in range(2, 9):
            parts = [path.with_name(path.stem + f".part{i}of{n}.json") for i in range(n)]
            if all(p.is_file() for p in parts):
                return finish(merge([Sensitivity.load(p) for p in parts], sess.engine.w), dirty=True)
    sens = measure(sess.engine, sess.ref, sess.stats, candidates=candidates, probe=probe,
                   source_hash=h, granularity=granularity, progress=progress)
    if use_cache:
        sens.save(path)
    return sens


def allocate_budget(sess: Session, sens: Sensitivity, budget: str | int,
                    candidates: Sequence[str] | None = None) -> Allocation:
    b = parse_budget(budget, sess.shapes)
    return allocate(sens, b, candidates=candidates, budget_spec=str(budget))


__all__ = [
    "Session", "open_session", "sensitivity", "allocate_budget", "Allocation", "allocate",
    "parse_budget", "profile_toml", "write_profile", "Sensitivity", "CalibrationStats",
    "calibration_stats", "Engine", "Reference",
]
