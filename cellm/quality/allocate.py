"""Budgeted allocation: one scheme per tensor minimising the predicted KL under a byte budget.

Model: the KL of a mixed model is predicted as the SUM of the per-tensor KLs measured by
``cellm.quality.sensitivity`` (small perturbations of different tensors add up to first order).
That makes the choice a multiple-choice knapsack; we solve it exactly by dynamic programming over
the byte budget (discretised, costs rounded up). A greedy on convex hulls fails here: the tied
embedding is one huge item (its i8 upgrade costs 71 MB at once) that a ratio greedy never affords
after spending the budget on small upgrades. The result is a deterministic function of the cached
measurements.

The result is written as an ordinary profile TOML (exact-name rules, then ``.*`` -> f16), with a
comment header holding the budget, the predicted KL and the byte counts.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping, Sequence

from cellm.errors import CellmError, ProfileError
from cellm.quality.sensitivity import Sensitivity

BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*-\s*([A-Za-z0-9._-]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Allocation:
    schemes: dict[str, str]  # tensor -> scheme (candidates only)
    predicted_kl: float
    total_bytes: int  # candidates + fixed tensors
    budget_bytes: int
    budget_spec: str

    def bytes_by_scheme(self, sens: Sensitivity) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, s in self.schemes.items():
            out[s] = out.get(s, 0) + sens.nbytes[t][s]
        return dict(sorted(out.items()))


def profile_bytes(profile: str, shapes: Mapping[str, tuple[int, ...]]) -> int:
    from cellm.profile import load_profile

    return load_profile(profile).plan(shapes).total_bytes


def parse_budget(spec: str | int, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """``240000000`` / ``"240MB"`` / ``"0.55x-int8-v1"`` (a fraction of a profile's tensor bytes)."""
    if isinstance(spec, int):
        return spec
    s = str(spec).strip()
    m = BUDGET_RE.match(s)
    if m:
        return int(float(m.group(1)) * profile_bytes(m.group(2), shapes))
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.match(r"^([0-9]*\.?[0-9]+)\s*([A-Za-z]*)$", s)
    if m and m.group(2).upper() in units:
        return int(float(m.group(1)) * units[m.group(2).upper()])
    raise CellmError(
        f"budget {spec!r} not understood; use a byte count ('240000000', '240MB') or "
        f"'<fraction>x-<profile>' such as '0.55x-int8-v1'"
    )


def _hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower convex hull of (bytes, kl) options, cheapest first, KL strictly decreasing."""
    options = sorted(options, key=lambda o: (o[0], o[1], o[2]))
    pruned: list[tuple[int, float, str]] = []
    for o in options:
        if pruned and o[1] >= pruned[-1][1]:
            continue  # costs more, no better
        if pruned and o[0] == pruned[-1][0]:
            pruned[-1] = o
            continue
        pruned.append(o)
    hull: list[tuple[int, float, str]] = []
    for o in pruned:
        while len(hull) >= 2:
            (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
            # slope hull[-2]->hull[-1] must be steeper (more KL saved per byte) than hull[-1]->o
            if (k1 - k2) * (o[0] - b2) <= (k2 - o[1]) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def family_pattern(name: str) -> str:
    """The layer-agnostic regex of a tensor's family (``model\\.layers\\.\\d+\\.mlp\\.down_proj\\.weight``)."""
    m = re.fullmatch(r"model\.layers\.\d+\.(.*)", name)
    if m is None:
        return re.escape(name)
    return r"model\.layers\.\d+\." + re.escape(m.group(1))


def by_family(sens: Sensitivity) -> Sensitivity:
    """Sensitivity aggregated per tensor family across layers (units named by their regex): one
    scheme per family gives a profile valid for every Gemma-3 size."""
    kl: dict[str, dict[str, float]] = {}
    nb: dict[str, dict[str, int]] = {}
    for t in sorted(sens.kl):
        pats = sorted(family_pattern(m) for m in sens.tensors_of(t))
        f = pats[0] if len(pats) == 1 else "(?:" + "|".join(pats) + ")"
        for s in sens.candidates:
            if s in sens.kl[t]:
                kl.setdefault(f, {}).setdefault(s, 0.0)
                kl[f][s] += sens.kl[t][s]
                nb.setdefault(f, {}).setdefault(s, 0)
                nb[f][s] += sens.nbytes[t][s]
    return dataclasses.replace(sens, kl=kl, nbytes=nb, measured={}, top1={}, err={}, members={})


def allocate(sens: Sensitivity, budget_bytes: int, *, candidates: Sequence[str] | None = None,
             budget_spec: str = "", forced: Mapping[str, str] | None = None,
             resolution: int = 200000) -> Allocation:
    """Exact multiple-choice knapsack by dynamic programming over the byte budget, discretised into
    ``resolution`` steps with every cost rounded UP (so the result always fits; at most one step of
    slack per unit is lost). ``forced`` pins units to schemes. Deterministic (ties: the first
    candidate in ``candidates`` order / the lower capacity)."""
    import numpy as np

    cands = tuple(candidates or sens.candidates)
    forced = dict(forced or {})
    units = sorted(sens.kl)
    opts: list[list[tuple[int, float, str]]] = []
    for t in units:
        if t in forced:
            s = forced[t]
            o = [(sens.nbytes[t][s], float(sens.kl[t][s]), s)]
        else:
            o = [(sens.nbytes[t][s], float(sens.kl[t][s]), s) for s in cands if s in sens.kl[t]]
        if not o:
            raise CellmError(f"no candidate scheme measured for {t}; measured: {sorted(sens.kl[t])}")
        opts.append(o)
    minimum = sens.fixed_bytes + sum(min(b for b, _, _ in o) for o in opts)
    if minimum > budget_bytes:
        raise CellmError(
            f"budget {budget_bytes} bytes is below the smallest possible size {minimum} bytes "
            f"(every tensor at its cheapest candidate)"
        )
    cap_bytes = budget_bytes - sens.fixed_bytes
    step = max(1, -(-cap_bytes // int(resolution)))
    cap = cap_bytes // step
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((len(units), cap + 1), dtype=np.int16)
    for i, o in enumerate(opts):
        new = np.full(cap + 1, inf)
        for j, (b, k, _) in enumerate(o):
            w = -(-b // step)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = dp[: cap + 1 - w] + k
            better = cand < new
            new[better] = cand[better]
            choice[i][better] = j
        dp = new
    c = int(np.argmin(dp))  # lowest KL; argmin takes the smallest capacity among ties
    if not np.isfinite(dp[c]):
        raise CellmError(f"budget {budget_bytes} bytes cannot be met after rounding to {step}-byte steps")
    schemes: dict[str, str] = {}
    for i in range(len(units) - 1, -1, -1):
        j = int(choice[i][c])
        b, _, s = opts[i][j]
        schemes[units[i]] = s
        c -= -(-b // step)
    total = sens.fixed_bytes + sum(sens.nbytes[t][s] for t, s in schemes.items())
    kl = sum(float(sens.kl[t][s]) for t, s in schemes.items())
    return Allocation(schemes=dict(sorted(schemes.items())), predicted_kl=float(kl), total_bytes=int(total),
                      budget_bytes=int(budget_bytes), budget_spec=budget_spec or str(budget_bytes))


def profile_toml(alloc: Allocation, sens: Sensitivity, *, name: str = "mixed-int4",
                 gate_class: str = "int4", description: str | None = None,
                 extra_comment: Sequence[str] = (), patterns: bool = False) -> str:
    """The allocation as a reviewable profile: exact-name rules (sorted), then '.*' -> f16.
    ``patterns``: the allocation's keys already are regexes (family granularity, ``by_family``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ProfileError(f"profile name {name!r} must be a [A-Za-z0-9._-] string")
    by = alloc.bytes_by_scheme(sens)
    rules = sorted((t, u) for u in alloc.schemes for t in ([u] if patterns else sens.tensors_of(u)))
    lines = [
        "# Generated by `cellm quality allocate` (cellm.quality.allocate) — measured, not hand-tuned.",
        f"# Budget: {alloc.budget_spec} = {alloc.budget_bytes} bytes of tensor data;"
        f" allocated {alloc.total_bytes} bytes ({alloc.total_bytes / 1e6:.1f} MB).",
        f"# Predicted mean KL (sum of per-unit sensitivities): {alloc.predicted_kl:.5f}",
        f"# Sensitivity: probe {sens.probe} measured alone per unit on {sens.n_tokens} calibration"
        f" tokens; other schemes scaled by the output-error ratio tr(dW H dW^T), except the embedding,"
        f" whose every candidate is measured directly.",
        f"# Source content hash: {sens.source_hash}",
        "# Bytes per scheme: " + ", ".join(f"{s} {b}" for s, b in by.items()),
    ]
    lines += [f"# {c}" for c in extra_comment]
    desc = description or (
        f"sensitivity-driven mixed precision under {alloc.budget_spec}: "
        + ", ".join(f"{sum(1 for v in alloc.schemes.values() if v == s)} x {s}" for s in by)
    )
    lines += [
        f'name = "{name}"',
        f'description = "{desc}"',
        f'gate_class = "{gate_class}"',
        "",
    ]
    for t, u in rules:
        s = alloc.schemes[u]
        if s == "f16":
            continue  # the final catch-all keeps it f16
        lines += [
            "[[rules]]",
            f"pattern = '{t if patterns else re.escape(t)}'",
            "ndim = 2",
            f'scheme = "{s}"',
            f"note = '{u}: predicted KL {sens.kl[u][s]:.2e}'",
            "",
        ]
    lines += ["[[rules]]", "pattern = '.*'", 'scheme = "f16"', 'note = "norms and unallocated tensors"', ""]
    return "\n".join(lines)


def write_profile(path: str | Path, text: str) -> Path:
    from cellm.profile import parse_profile
    from cellm.atomic import atomic_write

    parse_profile(text.encode("utf-8"), str(path))  # must be a valid profile
    return atomic_write(path, lambda f: f.write(text), binary=False)
