"""Sensitivity: how much each tensor, quantized ALONE to a candidate scheme, damages the model.

Measured, not guessed: for every quantizable 2-D tensor ``t`` we quantize only ``t`` with the
``probe`` scheme (default ``q4g32-gptq``), run the float32 reference from ``t``'s layer on (the
earlier layers' outputs are cached) on calibration windows, and record the mean next-token KL against
the unquantized model. Other candidate schemes of the same tensor are predicted from that measurement
by the ratio of the layer-output error energies ``tr(dW H dW^T)`` (``H`` = calibration X^T X):

    KL(t, s) ~= KL_measured(t, probe) * E(t, s) / E(t, probe)

(small-perturbation KL is quadratic in the output perturbation, and the same tensor propagates both
perturbations through the same downstream network). ``validate`` measures a sample of (tensor, scheme)
pairs directly and reports the Spearman rank correlation of predicted vs measured KL.

Everything is cached per source content hash under ``$CELLM_CACHE/quality/<hash>/`` as JSON
(``sensitivity-<key>.json``), keyed by the schemes, probe, token windows and quantizer versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cellm.errors import CellmError
from cellm.quality.calibration import CalibrationStats, quality_cache_dir
from cellm.quality.engine import EMBED, Engine, Reference
from cellm.quant.schemes import get_scheme

SENS_VERSION = 1
DEFAULT_CANDIDATES = ("f16", "i8", "q6g32", "q6g32-sym", "q4g32-gptq")
DEFAULT_PROBE = "q4g32-gptq"
# the embedding (tied LM head) is one huge unit whose error-ratio prediction was off by 2x for i8:
# every candidate of it is MEASURED directly (one forward each), never predicted
MEASURED_UNITS = (EMBED,)


def unit_of(name: str, granularity: str = "block") -> str:
    """Measurement unit of a tensor. ``tensor``: itself. ``block``: the attention projections of a
    layer together, the MLP gate+up together, down_proj alone, the embedding alone (the layer's
    sub-blocks that see the same input / play one role; 55 units on an 18-layer model)."""
    if granularity == "tensor":
        return name
    m = re.fullmatch(r"(model\.layers\.\d+)\.(self_attn|mlp)\.(\w+)\.weight", name)
    if m is None:
        return name
    if m.group(2) == "self_attn":
        return f"{m.group(1)}.self_attn"
    if m.group(3) in ("gate_proj", "up_proj"):
        return f"{m.group(1)}.mlp.gate_up"
    return name


def quantizable(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The 2-D weights a profile may quantize (decoder projections and the tied embedding)."""
    return sorted(n for n, a in weights.items() if a.ndim == 2)


def fake_quant(name: str, w: np.ndarray, scheme: str, stats: CalibrationStats | None) -> np.ndarray:
    """quantize -> dequantize through the registered scheme (calibration passed when it takes it)."""
    s = get_scheme(scheme)
    kw: dict[str, Any] = {}
    if getattr(s, "needs_calibration", False):  # exactly what the converter passes
        kw["hessian"] = stats.hessian(name)
    return s.dequantize(s.quantize(w, **kw), w.shape)


def output_error(w: np.ndarray, dq: np.ndarray, h: np.ndarray | None) -> float:
    """Mean squared layer-output perturbation per token: tr(dW H dW^T) (plain ||dW||^2 without H)."""
    d = (dq - w).astype(np.float32)
    if h is None:
        return float((d.astype(np.float64) ** 2).sum())
    return float(np.einsum("ij,ij->", d @ h, d, dtype=np.float64))


@dataclasses.dataclass
class Sensitivity:
    """Per-unit measurements: ``kl[u][scheme]`` (predicted/measured), ``measured[u][scheme]``,
    ``err[u][scheme]`` (output error energy), ``nbytes[u][scheme]``; ``members[u]`` = the tensors of
    unit ``u`` (a unit takes one scheme); plus metadata."""

    source_hash: str
    candidates: tuple[str, ...]
    probe: str
    n_tokens: int
    kl: dict[str, dict[str, float]]
    measured: dict[str, dict[str, float]]
    top1: dict[str, dict[str, float]]
    err: dict[str, dict[str, float]]
    nbytes: dict[str, dict[str, int]]
    fixed_bytes: int  # tensors that are not candidates (norms): always f16
    seconds: float = 0.0
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)
    members: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def tensors_of(self, unit: str) -> list[str]:
        return self.members.get(unit, [unit])

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["version"] = SENS_VERSION
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Sensitivity":
        d = dict(d)
        d.pop("version", None)
        d["candidates"] = tuple(d["candidates"])
        return cls(**d)

    def save(self, path: Path) -> None:
        from cellm.atomic import write_json

        write_json(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: Path) -> "Sensitivity":
        return cls.from_json(json.loads(Path(path).read_text()))


def scheme_bytes(name: str, shape: tuple[int, ...], scheme: str) -> int:
    return sum(int(s.nbytes) for s in get_scheme(scheme).specs(name, tuple(shape)))


def measure(engine: Engine, ref: Reference, stats: CalibrationStats, *,
            candidates: Sequence[str] = DEFAULT_CANDIDATES, probe: str = DEFAULT_PROBE,
            tensors: Iterable[str] | None = None, source_hash: str = "", granularity: str = "block",
            progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Measure the KL of each unit quantized alone with ``probe``; predict the other candidates
    from the ratio of summed output-error energies."""
    t0 = time.time()
    w = engine.w
    names = list(tensors) if tensors is not None else quantizable(w)
    if probe not in candidates:
        raise CellmError(f"probe scheme {probe!r} must be one of the candidates {list(candidates)}")
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(unit_of(n, granularity), []).append(n)
    kl: dict[str, dict[str, float]] = {}
    measured: dict[str, dict[str, float]] = {}
    top1: dict[str, dict[str, float]] = {}
    err: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    for i, unit in enumerate(sorted(members)):
        errs = {s: 0.0 for s in candidates}
        probe_dq: dict[str, np.ndarray] = {}
        for name in members[unit]:
            h = stats.hessian(name) if name in stats else None
            for s in candidates:
                if s == "f16":
                    continue
                dq = fake_quant(name, w[name], s, stats)
                errs[s] += output_error(w[name], dq, h)
                if s == probe:
                    probe_dq[name] = dq
        m_kl, m_top = ref.measure(probe_dq)
        measured[unit] = {probe: m_kl}
        top1[unit] = {probe: m_top}
        base = max(errs[probe], 1e-30)
        kl[unit] = {s: (0.0 if s == "f16" else max(m_kl, 0.0) * errs[s] / base) for s in candidates}
        err[unit] = errs
        if unit in MEASURED_UNITS:
            _measure_directly(engine, ref, stats, unit, members[unit],
                              [s for s in candidates if s not in ("f16", probe)], kl, measured, top1)
        nbytes[unit] = {s: sum(scheme_bytes(n, w[n].shape, s) for n in members[unit]) for s in candidates}
        if progress is not None:
            progress(f"[{i + 1}/{len(members)}] {unit}: KL({probe}) = {m_kl:.5f} top-1 {m_top:.3f} "
                     f"({time.time() - t0:.0f}s)")
    covered = {n for ms in members.values() for n in ms}
    fixed = sum(scheme_bytes(n, a.shape, "f16") for n, a in w.items() if n not in covered)
    return Sensitivity(source_hash=source_hash, candidates=tuple(candidates), probe=probe,
                       n_tokens=ref.n_tokens, kl=kl, measured=measured, top1=top1, err=err,
                       nbytes=nbytes, fixed_bytes=fixed, seconds=time.time() - t0, members=members)


def _measure_directly(engine: Engine, ref: Reference, stats: CalibrationStats | None, unit: str,
                      tensors: Sequence[str], schemes: Sequence[str], kl, measured, top1) -> None:
    for s in schemes:
        m_kl, m_top = ref.measure({n: fake_quant(n, engine.w[n], s, stats) for n in tensors})
        measured[unit][s] = m_kl
        top1[unit][s] = m_top
        kl[unit][s] = max(m_kl, 0.0)


def extend(sens: Sensitivity, engine: Engine, ref: Reference, stats: CalibrationStats,
           candidates: Sequence[str], progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Add candidate schemes to cached measurements WITHOUT re-measuring the probe: each new scheme
    costs its fake-quantization and error energy per tensor (plus one forward for the units in
    ``MEASURED_UNITS``). The result equals what ``measure`` with the union of candidates gives."""
    new = [c for c in candidates if c not in sens.candidates]
    unmeasured = {u: [c for c in tuple(sens.candidates) + tuple(new)
                      if c not in ("f16", sens.probe) and c not in sens.measured.get(u, {})]
                  for u in MEASURED_UNITS if u in sens.kl}
    if not new and not any(unmeasured.values()):
        return sens
    t0 = time.time()
    w = engine.w
    for i, unit in enumerate(sorted(sens.kl)):
        members = sens.tensors_of(unit)
        probe_err = max(sens.err[unit][sens.probe], 1e-30)
        m_kl = max(sens.measured[unit][sens.probe], 0.0)
        for s in new:
            e = 0.0
            for name in members:
                if s != "f16":
                    h = stats.hessian(name) if name in stats else None
                    e += output_error(w[name], fake_quant(name, w[name], s, stats), h)
            sens.err[unit][s] = e
            sens.kl[unit][s] = 0.0 if s == "f16" else m_kl * e / probe_err
            sens.nbytes[unit][s] = sum(scheme_bytes(n, w[n].shape, s) for n in members)
        if unmeasured.get(unit):
            _measure_directly(engine, ref, stats, unit, members, unmeasured[unit],
                              sens.kl, sens.measured, sens.top1)
        if progress is not None:
            progress(f"[{i + 1}/{len(sens.kl)}] {unit}: +{','.join(new)} ({time.time() - t0:.0f}s)")
    sens.candidates = tuple(sens.candidates) + tuple(new)
    sens.seconds += time.time() - t0
    return sens


def merge(parts: Sequence[Sensitivity], weights: Mapping[str, np.ndarray]) -> Sensitivity:
    """Combine shard results (disjoint units) into one Sensitivity."""
    first = parts[0]
    out = dataclasses.replace(first, kl={}, measured={}, top1={}, err={}, nbytes={}, members={},
                              seconds=0.0)
    for p in parts:
        for f in ("kl", "measured", "top1", "err", "nbytes", "members"):
            getattr(out, f).update(getattr(p, f))
        out.seconds = max(out.seconds, p.seconds)
    covered = {n for ms in out.members.values() for n in ms}
    out.fixed_bytes = sum(scheme_bytes(n, a.shape, "f16") for n, a in weights.items() if n not in covered)
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64)))
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64)))
    if len(ra) < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def validate(engine: Engine, ref: Reference, stats: CalibrationStats, sens: Sensitivity,
             pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Measure KL directly for (tensor, scheme) pairs and compare with the predictions."""
    rows = []
    for unit, s in pairs:
        ov = {n: fake_quant(n, engine.w[n], s, stats) for n in sens.tensors_of(unit)}
        m, _ = ref.measure(ov)
        rows.append({"unit": unit, "scheme": s, "predicted": sens.kl[unit][s], "measured": m})
        sens.measured.setdefault(unit, {})[s] = m
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    sens.validation = {"spearman": rho, "pairs": rows}
    return sens.validation


def sensitivity_key(source_hash: str, candidates: Sequence[str] | None, probe: str, ids: np.ndarray,
                    stats_key: str, granularity: str = "block") -> str:
    """Cache key of a measurement. ``candidates=None`` (the current layout): the key does not depend
    on the candidate list, which the cached file records and ``extend`` grows; a list gives the key
    of the first layout (files measured before candidates became extendable)."""
    h = hashlib.sha256()
    cand = ["candidates-extendable"] if candidates is None else [",".join(candidates)]
    for part in (f"v{SENS_VERSION}", source_hash, *cand, probe, stats_key, granularity):
        h.update(part.encode() + b"\0")
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def sensitivity_path(source_hash: str, key: str, cache_dir=None) -> Path:
    return quality_cache_dir(source_hash, cache_dir) / f"sensitivity-{key[:16]}.json"
