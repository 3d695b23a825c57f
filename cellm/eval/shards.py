"""Sharded evaluation: plan → shards → merge. :func:`cellm.eval.evaluate` is this same path run in one
process; the Prefect flows run the shards as separate tasks (threads or Dask workers).

* :func:`plan_eval_shards` tokenizes the corpus and prompts once, computes the reference side once per
  source (or loads it from the reference cache, see :mod:`cellm.eval.reference`; the cache file is
  written atomically, so concurrent plans never corrupt it) and splits the work: contiguous runs of
  teacher-forced windows (balanced by scored tokens) and generation groups. The plan is a small JSON
  file (:meth:`EvalPlan.save`); it names the reference cache file the shards read.
* :func:`evaluate_shard` runs the candidate over one shard's windows and generation groups and saves
  the raw per-token values (KL, top-1 hit, log-prob of the target) and the greedy token ids to a small
  ``.npz`` (atomic), tagged with the plan's digest.
* :func:`merge_eval_shards` concatenates the per-token values in corpus order and computes every metric
  from them exactly as an unsharded run does, so the report's numbers are identical for any shard
  count (the per-token values do not depend on the shard: each window runs from a fresh state, and a
  generation group is the same batch whichever shard runs it).

Generation groups: ``gen_group`` prompts are generated in lock-step per group (0 = all prompts in one
group, the historic behaviour). The groups, not the shard count, define the batches, so the
generation checks are equal for any number of shards; ``gen_group > 0`` spreads generation over shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cellm.atomic import atomic_write
from cellm.errors import EvalError
from cellm.eval import data, metrics, reference
from cellm.eval.runner import Progress, greedy_batch, teacher_forced

MAX_SHARDS = 1024
PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EvalShard:
    index: int
    windows: tuple[int, int]  # [start, stop) window indices
    positions: tuple[int, int]  # [start, stop) scored positions (rows of the reference stats)
    groups: tuple[int, ...]  # generation groups (indices into EvalPlan.groups)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    candidate: str  # display name in the report
    gate_class: Optional[str]
    reference: str  # display name in the report
    key: str  # reference cache key
    reference_path: Optional[str]  # the cached reference stats the shards read (None: in memory only)
    reference_cached: bool
    reference_seconds: float
    settings: dict[str, Any]  # window, top_k, gen_tokens, max_tokens, gen_group, corpus/prompts sha256
    windows: tuple[tuple[int, ...], ...]  # token ids of each teacher-forced window ([bos] + chunk)
    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]  # prompt indices generated together
    shards: tuple[EvalShard, ...]

    @property
    def positions(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["version"] = PLAN_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalPlan":
        if d.get("version") != PLAN_VERSION:
            raise EvalError(f"eval plan version {d.get('version')!r} is not {PLAN_VERSION}")
        try:
            return cls(
                candidate=d["candidate"], gate_class=d["gate_class"], reference=d["reference"], key=d["key"],
                reference_path=d["reference_path"], reference_cached=bool(d["reference_cached"]),
                reference_seconds=float(d["reference_seconds"]), settings=dict(d["settings"]),
                windows=tuple(tuple(int(t) for t in w) for w in d["windows"]),
                prompts=tuple(d["prompts"]), prompt_ids=tuple(tuple(int(t) for t in p) for p in d["prompt_ids"]),
                groups=tuple(tuple(int(i) for i in g) for g in d["groups"]),
                shards=tuple(EvalShard(int(s["index"]), tuple(s["windows"]), tuple(s["positions"]),
                                       tuple(int(g) for g in s["groups"])) for s in d["shards"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EvalError(f"malformed eval plan: {exc!r}") from exc

    @property
    def digest(self) -> str:
        """sha256 of everything that decides the shards' values (not the timings)."""
        d = self.to_dict()
        for k in ("reference_cached", "reference_seconds", "reference_path"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        text = json.dumps(self.to_dict(), separators=(",", ":")) + "\n"
        return atomic_write(path, lambda f: f.write(text), binary=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalPlan":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EvalError(f"cannot read eval plan {path}: {exc}") from exc
        return cls.from_dict(d)


@dataclasses.dataclass(frozen=True)
class ShardResult:
    index: int
    plan_digest: str
    kl: np.ndarray  # float64 [n] per scored position
    top1: np.ndarray  # bool [n]
    target_lp: np.ndarray  # float32 [n] candidate log-prob of the actual next token
    generations: dict[int, tuple[int, ...]]  # prompt index -> greedy ids
    seconds: float


def check_shard_count(shards: Any, *, allow_auto: bool = False) -> int:
    """``shards`` if it is a valid shard count (``allow_auto``: 0 too, meaning "let the caller choose")."""
    lo = 0 if allow_auto else 1
    if isinstance(shards, bool) or not isinstance(shards, int) or not lo <= shards <= MAX_SHARDS:
        raise EvalError(f"eval shards={shards!r} must be an integer in [{lo}, {MAX_SHARDS}]"
                        + (" (0 = auto)" if allow_auto else ""))
    return shards


# ---------------------------------------------------------------------------------------------- plan

def _split_windows(lengths: Sequence[int], n: int) -> list[tuple[int, int]]:
    """``n`` contiguous window ranges with about equal scored tokens (some empty when n > windows)."""
    cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(cum[-1])
    bounds = [0] + [int(np.searchsorted(cum, total * s / n, side="left")) for s in range(1, n)] + [len(lengths)]
    bounds = [min(max(b, 0), len(lengths)) for b in bounds]
    for i in range(1, len(bounds)):
        bounds[i] = max(bounds[i], bounds[i - 1])
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def _candidate(candidate: Any) -> tuple[Any, str]:
    """(loadable model or object, display name) without hashing the candidate."""
    if hasattr(candidate, "forward"):
        return candidate, "model"
    if hasattr(candidate, "load") and hasattr(candidate, "config"):
        return candidate, str(getattr(candidate, "name", candidate))
    p = Path(os.fspath(candidate))
    if p.is_file() and p.suffix == ".cellm":
        return p, str(p)
    from cellm.sources import open_source

    return open_source(str(candidate)), str(candidate)


def prepare(candidate: Any, reference_source: Any, shards: int = 1, *, corpus=None, prompts=None,
            window: int, top_k: int, gen_tokens: int, max_tokens: Optional[int], gen_group: int = 0,
            cache=None, use_cache: bool = True, save_reference: bool = True, threads: Optional[int] = None,
            progress: Progress = None):
    """The plan plus what an in-process run keeps in memory: (plan, reference stats, tokenizer)."""
    from cellm.eval.evaluate import _config_of, _gate_class_of, _resolve
    from cellm.runtime import load_model
    from cellm.runtime.tokenizer import Tokenizer

    n = check_shard_count(shards)
    if isinstance(gen_group, bool) or not isinstance(gen_group, int) or gen_group < 0:
        raise EvalError(f"gen_group={gen_group!r} must be an integer >= 0 (0 = all prompts in one batch)")
    ref_obj, ref_id, ref_name = _resolve(reference_source)
    tok = Tokenizer.for_artifact(ref_obj)
    corpus_text, corpus_sha = data.read_text(corpus, data.DEFAULT_CORPUS)
    prompts_text, prompts_sha = data.read_text(prompts, data.DEFAULT_PROMPTS)
    prompt_list = data.parse_prompts(prompts_text)
    if not prompt_list:
        raise EvalError(f"no prompts in {prompts or data.DEFAULT_PROMPTS}")
    ids = tok.encode(corpus_text, add_bos=False)
    if max_tokens:  # None or 0: the whole corpus
        ids = ids[: int(max_tokens)]
    if len(ids) < 16:
        raise EvalError(f"the eval corpus has {len(ids)} tokens; need at least 16")
    window = min(int(window), _config_of(ref_obj).max_position_embeddings)
    windows = data.corpus_windows(ids, tok.bos_id if tok.bos_id is not None else 2, window)
    prompt_ids = [tok.encode(p, add_bos=True) for p in prompt_list]

    computed = False
    key = reference.cache_key(ref=ref_id, corpus=corpus_sha, prompts=prompts_sha, window=window, k=top_k,
                              gen=gen_tokens, max_tokens=max_tokens)
    cdir = reference.cache_dir(cache)
    stats = reference.load(cdir, key) if use_cache else None
    t_ref = time.perf_counter()
    if stats is None:
        ref_model = load_model(ref_obj, threads=threads)
        stats = reference.compute(ref_model, windows, prompt_ids, k=top_k, gen_tokens=gen_tokens,
                                  stop_ids=ref_model.config.eos_token_ids, key=key, progress=progress)
        if save_reference:
            reference.save(stats, cdir)
        computed = True
        del ref_model
    t_ref = time.perf_counter() - t_ref
    ref_path = str((cdir / f"{key}.npz").resolve()) if (save_reference or not computed) else None

    gsize = gen_group or len(prompt_list)
    groups = [tuple(range(a, min(a + gsize, len(prompt_list)))) for a in range(0, len(prompt_list), gsize)]
    lens = [len(w) - 1 for w in windows]
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    shard_list = []
    for i, (a, b) in enumerate(_split_windows(lens, n)):
        gs = tuple(g for g in range(len(groups)) if (n - 1 - g) % n == i)  # generation on the last shards
        shard_list.append(EvalShard(i, (a, b), (int(offs[a]), int(offs[b])), gs))
    _, cand_name = _candidate(candidate)
    plan = EvalPlan(
        candidate=cand_name, gate_class=_gate_class_of(candidate), reference=ref_name, key=key,
        reference_path=ref_path, reference_cached=not computed, reference_seconds=round(t_ref, 2),
        settings={"window": window, "top_k": top_k, "gen_tokens": gen_tokens, "max_tokens": max_tokens,
                  "gen_group": gen_group, "corpus_sha256": corpus_sha, "prompts_sha256": prompts_sha},
        windows=tuple(tuple(int(t) for t in w) for w in windows), prompts=tuple(prompt_list),
        prompt_ids=tuple(tuple(int(t) for t in p) for p in prompt_ids), groups=tuple(groups),
        shards=tuple(shard_list),
    )
    if len(stats.target_lp) != plan.positions:
        raise EvalError(f"the reference has {len(stats.target_lp)} scored positions; the plan {plan.positions}")
    return plan, stats, tok


def plan_eval_shards(candidate: Any, reference_source: Any, shards: int, *, corpus=None, prompts=None,
                     window: Optional[int] = None, top_k: Optional[int] = None, gen_tokens: Optional[int] = None,
                     max_tokens: Any = "default", gen_group: int = 0, cache=None, use_cache: bool = True,
                     threads: Optional[int] = None, progress: Progress = None) -> EvalPlan:
    """Plan ``shards`` shards of ``evaluate(candidate, reference_source, ...)`` (same keyword
    arguments and defaults). The reference is computed here at most once and always left in the
    reference cache (``use_cache=False`` recomputes and overwrites it), where the shards read it."""
    from cellm.eval.evaluate import DEFAULT_GEN_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_TOP_K, DEFAULT_WINDOW

    plan, _, _ = prepare(
        candidate, reference_source, shards, corpus=corpus, prompts=prompts,
        window=DEFAULT_WINDOW if window is None else window, top_k=DEFAULT_TOP_K if top_k is None else top_k,
        gen_tokens=DEFAULT_GEN_TOKENS if gen_tokens is None else gen_tokens,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens == "default" else max_tokens, gen_group=gen_group,
        cache=cache, use_cache=use_cache, save_reference=True, threads=threads, progress=progress)
    return plan


# --------------------------------------------------------------------------------------------- shard

def _load_reference(plan: EvalPlan) -> reference.ReferenceStats:
    if not plan.reference_path:
        raise EvalError("the eval plan has no reference file (planned with the reference in memory only)")
    p = Path(plan.reference_path)
    stats = reference.load(p.parent, plan.key)
    if stats is None:
        raise EvalError(f"reference stats {p} missing or unreadable (the plan's cache file)")
    if len(stats.target_lp) != plan.positions:
        raise EvalError(f"reference stats {p} have {len(stats.target_lp)} positions; the plan {plan.positions}")
    return stats


def run_shard(candidate: Any, plan: EvalPlan, index: int, *, stats: Optional[reference.ReferenceStats] = None,
              threads: Optional[int] = None, progress: Progress = None) -> ShardResult:
    """Shard ``index`` of ``plan`` in memory. ``candidate``: a .cellm path / source spec, or a loaded model."""
    from cellm.runtime import load_model

    if not isinstance(index, int) or not 0 <= index < len(plan.shards):
        raise EvalError(f"shard index {index!r} is outside [0, {len(plan.shards)})")
    t0 = time.perf_counter()
    shard = plan.shards[index]
    stats = stats if stats is not None else _load_reference(plan)
    obj, _ = _candidate(candidate)
    cand = obj if hasattr(obj, "forward") else load_model(obj, threads=threads)
    if int(stats.top_idx.max(initial=0)) >= cand.config.vocab_size:
        raise EvalError(f"candidate vocab_size={cand.config.vocab_size} is smaller than the reference's "
                        f"(token id {int(stats.top_idx.max())} seen)")
    kl, top1, tlp, off = [], [], [], [shard.positions[0]]

    def consume(lp: np.ndarray, tgt: np.ndarray) -> None:
        a = off[0]
        b = a + len(tgt)
        kl.append(metrics.kl_topk(stats.top_idx[a:b], stats.top_lp[a:b], lp))
        top1.append(np.argmax(lp, axis=-1) == stats.top_idx[a:b, 0])
        tlp.append(np.take_along_axis(lp, tgt[:, None], -1)[:, 0])
        off[0] = b

    wins = [np.asarray(w, dtype=np.int64) for w in plan.windows[shard.windows[0] : shard.windows[1]]]
    teacher_forced(cand, wins, consume, progress, stage="candidate teacher-forced")
    if off[0] != shard.positions[1]:
        raise EvalError(f"shard {index} scored positions {shard.positions[0]}..{off[0]}, planned ..{shard.positions[1]}")
    gens: dict[int, tuple[int, ...]] = {}
    for g in shard.groups:
        members = plan.groups[g]
        outs = greedy_batch(cand, [plan.prompt_ids[i] for i in members], plan.settings["gen_tokens"],
                            cand.config.eos_token_ids, progress)
        gens.update({i: tuple(int(t) for t in o) for i, o in zip(members, outs)})

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    return ShardResult(index, plan.digest, cat(kl, np.float64), cat(top1, np.bool_), cat(tlp, np.float32), gens,
                       round(time.perf_counter() - t0, 3))


def save_shard(result: ShardResult, path: str | os.PathLike) -> Path:
    idx = np.asarray(sorted(result.generations), dtype=np.int64)
    lens = np.asarray([len(result.generations[i]) for i in idx], dtype=np.int64)
    flat = np.asarray([t for i in idx for t in result.generations[i]], dtype=np.int64)
    meta = json.dumps({"index": result.index, "plan_digest": result.plan_digest, "seconds": result.seconds})
    return atomic_write(path, lambda f: np.savez(f, kl=result.kl, top1=result.top1, target_lp=result.target_lp,
                                                 gen_index=idx, gen_lens=lens, gen_flat=flat, meta=np.asarray(meta)))


def load_shard(path: str | os.PathLike) -> ShardResult:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            offs = np.concatenate([[0], np.cumsum(z["gen_lens"])])
            flat = z["gen_flat"]
            gens = {int(i): tuple(int(t) for t in flat[offs[j] : offs[j + 1]]) for j, i in enumerate(z["gen_index"])}
            return ShardResult(int(meta["index"]), str(meta["plan_digest"]), z["kl"], z["top1"], z["target_lp"],
                               gens, float(meta["seconds"]))
    except (OSError, KeyError, ValueError) as exc:
        raise EvalError(f"cannot read eval shard {path}: {exc}") from exc


def evaluate_shard(candidate: Any, plan: EvalPlan | str | os.PathLike, index: int, out: str | os.PathLike, *,
                   threads: Optional[int] = None, progress: Progress = None) -> Path:
    """Run shard ``index`` of ``plan`` (an :class:`EvalPlan` or its JSON file) and save its raw
    per-token values to ``out`` (.npz, atomic); returns ``out``."""
    if not isinstance(plan, EvalPlan):
        plan = EvalPlan.load(plan)
    return save_shard(run_shard(candidate, plan, index, threads=threads, progress=progress), out)


# --------------------------------------------------------------------------------------------- merge

def merge_eval_shards(plan: EvalPlan | str | os.PathLike, results: Sequence[ShardResult | str | os.PathLike],
                      reference_source: Any = None, *, stats: Optional[reference.ReferenceStats] = None,
                      tokenizer: Any = None, seconds: Optional[dict[str, float]] = None):
    """The :class:`~cellm.eval.evaluate.EvalReport` of all shards of ``plan``: the same numbers as an
    unsharded ``evaluate``. ``reference_source`` supplies the tokenizer that decodes generations."""
    from cellm.eval.evaluate import EvalReport
    from cellm.runtime.tokenizer import Tokenizer

    t0 = time.perf_counter()
    if not isinstance(plan, EvalPlan):
        plan = EvalPlan.load(plan)
    res = [r if isinstance(r, ShardResult) else load_shard(r) for r in results]
    digest = plan.digest
    by_index: dict[int, ShardResult] = {}
    for r in res:
        if r.plan_digest != digest:
            raise EvalError(f"eval shard {r.index} belongs to another plan ({r.plan_digest[:12]} != {digest[:12]})")
        if r.index in by_index:
            raise EvalError(f"eval shard {r.index} given twice")
        by_index[r.index] = r
    missing = sorted(set(range(len(plan.shards))) - set(by_index))
    if missing or len(by_index) != len(plan.shards):
        raise EvalError(f"eval shards {missing} missing ({len(by_index)} of {len(plan.shards)} given)")
    ordered = [by_index[i] for i in range(len(plan.shards))]
    for s, r in zip(plan.shards, ordered):
        if len(r.kl) != s.positions[1] - s.positions[0]:
            raise EvalError(f"eval shard {s.index} has {len(r.kl)} positions; planned {s.positions[1] - s.positions[0]}")
    stats = stats if stats is not None else _load_reference(plan)
    if tokenizer is None:
        if reference_source is None:
            raise EvalError("merge_eval_shards needs the reference source (for its tokenizer) or a tokenizer")
        from cellm.eval.evaluate import _resolve

        tokenizer = Tokenizer.for_artifact(_resolve(reference_source)[0])
    gens: dict[int, tuple[int, ...]] = {}
    for r in ordered:
        gens.update(r.generations)
    if sorted(gens) != list(range(len(plan.prompts))):
        raise EvalError(f"generations cover {len(gens)} of {len(plan.prompts)} prompts")

    kl_all = np.concatenate([r.kl for r in ordered])
    nll_c = -np.concatenate([r.target_lp for r in ordered]).astype(np.float64)
    nll_r = -stats.target_lp.astype(np.float64)
    gen_rows, agree, exact, rep, degen, rep_ref = [], [], [], [], [], []
    for i, (p, r) in enumerate(zip(plan.prompts, stats.generations)):
        c = gens[i]
        ctext, rtext = tokenizer.decode(c), tokenizer.decode(r)
        a = metrics.agreement_length(r, c)
        agree.append(a / max(len(r), 1))
        exact.append(float(tuple(r) == tuple(c)))
        rep.append(metrics.ngram_repetition(list(c)))
        rep_ref.append(metrics.ngram_repetition(list(r)))
        degen.append(float(metrics.is_degenerate(c, ctext)))
        gen_rows.append({"prompt": p, "agreement": a, "reference_tokens": len(r), "candidate_tokens": len(c),
                         "reference_text": rtext, "candidate_text": ctext})
    m = {
        "mean_kl": float(kl_all.mean()),
        "p99_kl": metrics.percentile(kl_all, 99),
        "max_kl": float(kl_all.max()),
        "top1_agreement": float(np.concatenate([r.top1 for r in ordered]).mean()),
        "ppl_candidate": float(math.exp(nll_c.mean())),
        "ppl_reference": float(math.exp(nll_r.mean())),
        "ppl_ratio": float(math.exp(nll_c.mean() - nll_r.mean())),
        "ref_tail_mass_mean": float(np.clip(1 - np.exp(stats.top_lp.astype(np.float64)).sum(-1), 0, 1).mean()),
        "gen_agreement_mean": float(np.mean(agree)),
        "gen_exact_match_rate": float(np.mean(exact)),
        "gen_repetition_rate": float(np.mean(rep)),
        "gen_repetition_rate_reference": float(np.mean(rep_ref)),
        "gen_degenerate_rate": float(np.mean(degen)),
        "tokens": int(len(kl_all)),
        "prompts": len(plan.prompts),
    }
    st = plan.settings
    cand_s = round(sum(r.seconds for r in ordered), 2)
    settings = {
        "window": st["window"], "top_k": st["top_k"], "gen_tokens": st["gen_tokens"], "windows": len(plan.windows),
        "corpus_sha256": st["corpus_sha256"], "prompts_sha256": st["prompts_sha256"], "reference_cache_key": plan.key,
        "reference_cached": plan.reference_cached, "reference_seconds": plan.reference_seconds,
        "candidate_seconds": cand_s,
        "total_seconds": round((seconds or {}).get("total", plan.reference_seconds + cand_s + time.perf_counter() - t0), 2),
        "kl": "coarse-grained on the reference's top-K + tail bucket (lower bound of exact KL)",
        "shards": len(plan.shards),
    }
    if st.get("gen_group"):
        settings["gen_group"] = st["gen_group"]
    return EvalReport(plan.candidate, plan.reference, m, settings, tuple(gen_rows), plan.gate_class)
