"""``evaluate(candidate, reference)``: teacher-forced KL / top-1 / perplexity and generation checks.

Teacher forcing: the corpus is tokenized once (no BOS) and cut into independent windows of
``window`` tokens (default 512 = the 270M's sliding window): ``<bos>`` + 511 corpus tokens, each
window scoring its 511 next-token predictions, the last window shorter. Every corpus token is
predicted exactly once. Generation checks: for each prompt (``<bos>`` + prompt), ``gen_tokens``
greedy tokens from both models (stopping at the eos ids); agreement = common-prefix length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cellm.errors import EvalError
from cellm.eval import data, metrics, reference
from cellm.eval.runner import Progress, greedy_batch, teacher_forced

DEFAULT_WINDOW = 512
DEFAULT_TOP_K = 256
DEFAULT_GEN_TOKENS = 32
DEFAULT_MAX_TOKENS = 8 * (DEFAULT_WINDOW - 1)  # 4088 scored tokens: 8 full windows (keeps one eval < 1 min)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    candidate: str
    reference: str
    metrics: dict[str, float]
    settings: dict[str, Any]
    generations: tuple[dict[str, Any], ...]
    gate_class: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate, "reference": self.reference, "gate_class": self.gate_class,
            "metrics": dict(self.metrics), "settings": dict(self.settings),
            "generations": [dict(g) for g in self.generations],
        }

    def to_markdown(self, verdict: Any = None) -> str:
        m = self.metrics
        lines = [
            f"# Evaluation: `{self.candidate}`", "",
            f"Reference: `{self.reference}`  ", f"Gate class: `{self.gate_class}`", "",
            "| metric | value |", "|---|---|",
        ]
        for k in sorted(m):
            v = m[k]
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items())), ""]
        if verdict is not None:
            lines += [f"## Gate `{verdict.gate_class}`: {'PASS' if verdict.passed else 'FAIL'}", "",
                      "| metric | value | op | threshold | margin | ok |", "|---|---|---|---|---|---|"]
            for c in verdict.checks:
                lines.append(f"| {c.metric} | {c.value:.6g} | {c.op} | {c.threshold:g} | {c.margin:+.4g} | "
                             f"{'yes' if c.passed else 'NO'} |")
            lines.append("")
        lines += ["## Generations (greedy)", "", "| prompt | agree | reference | candidate |", "|---|---|---|---|"]
        for g in self.generations:
            cells = [str(g[k]).replace("|", "\\|").replace("\n", "⏎") for k in ("prompt", "agreement", "reference_text", "candidate_text")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(x: Any) -> tuple[Any, str, str]:
    """(loadable, identity hash, display name) for a .cellm path, a source spec/dir or a Checkpoint."""
    if hasattr(x, "load") and hasattr(x, "config"):
        return x, str(getattr(x, "content_hash", "")) or repr(x), str(getattr(x, "name", x))
    p = Path(os.fspath(x))
    if p.is_file() and p.suffix == ".cellm":
        return p, "sha256:" + _file_sha256(p), str(p)
    from cellm.sources import open_source

    ck = open_source(str(x))
    return ck, str(ck.content_hash), str(x)


def _config_of(obj: Any):
    if hasattr(obj, "config"):
        return obj.config
    from cellm.format.reader import CellmReader

    with CellmReader(obj) as r:
        return r.config


def _gate_class_of(candidate: Any) -> Optional[str]:
    p = Path(os.fspath(candidate)) if isinstance(candidate, (str, os.PathLike)) else None
    if p is None or p.suffix != ".cellm" or not p.is_file():
        return None
    try:
        from cellm.format.reader import CellmReader
        from cellm.profile import load_profile

        with CellmReader(p) as r:
            prof = r.header.get("cellm_profile")
        name = prof.get("name") if isinstance(prof, dict) else prof
        return load_profile(str(name)).gate_class if name else None
    except Exception:  # an unknown profile name just leaves the class to --gate-class
        return None


def evaluate(
    candidate: Any,
    reference_source: Any,
    *,
    corpus: Optional[str | os.PathLike] = None,
    prompts: Optional[str | os.PathLike] = None,
    window: int = DEFAULT_WINDOW,
    top_k: int = DEFAULT_TOP_K,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
    cache: Optional[str | os.PathLike] = None,
    use_cache: bool = True,
    threads: Optional[int] = None,
    progress: Progress = None,
) -> EvalReport:
    from cellm.runtime import load_model
    from cellm.runtime.tokenizer import Tokenizer

    t_start = time.perf_counter()
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
        if use_cache:
            reference.save(stats, cdir)
        computed = True
        del ref_model
    t_ref = time.perf_counter() - t_ref

    t_cand = time.perf_counter()
    cand_obj, _, cand_name = _resolve(candidate) if not hasattr(candidate, "forward") else (candidate, "", "model")
    cand = load_model(cand_obj, threads=threads)
    if int(stats.top_idx.max(initial=0)) >= cand.config.vocab_size:
        raise EvalError(f"candidate vocab_size={cand.config.vocab_size} is smaller than the reference's "
                        f"(token id {int(stats.top_idx.max())} seen)")

    kl, top1, tlp, off = [], [], [], [0]

    def consume(lp: np.ndarray, tgt: np.ndarray) -> None:
        a = off[0]
        b = a + len(tgt)
        kl.append(metrics.kl_topk(stats.top_idx[a:b], stats.top_lp[a:b], lp))
        top1.append(np.argmax(lp, axis=-1) == stats.top_idx[a:b, 0])
        tlp.append(np.take_along_axis(lp, tgt[:, None], -1)[:, 0])
        off[0] = b

    teacher_forced(cand, windows, consume, progress, stage="candidate teacher-forced")
    if off[0] != len(stats.target_lp):
        raise EvalError(f"scored {off[0]} positions but the cached reference has {len(stats.target_lp)}")
    gens = greedy_batch(cand, prompt_ids, gen_tokens, cand.config.eos_token_ids, progress)
    t_cand = time.perf_counter() - t_cand

    kl_all = np.concatenate(kl)
    nll_c = -np.concatenate(tlp).astype(np.float64)
    nll_r = -stats.target_lp.astype(np.float64)
    gen_rows, agree, exact, rep, degen, rep_ref = [], [], [], [], [], []
    for p, r, c in zip(prompt_list, stats.generations, gens):
        ctext, rtext = tok.decode(c), tok.decode(r)
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
        "top1_agreement": float(np.concatenate(top1).mean()),
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
        "prompts": len(prompt_list),
    }
    settings = {
        "window": window, "top_k": top_k, "gen_tokens": gen_tokens, "windows": len(windows),
        "corpus_sha256": corpus_sha, "prompts_sha256": prompts_sha, "reference_cache_key": key,
        "reference_cached": not computed, "reference_seconds": round(t_ref, 2),
        "candidate_seconds": round(t_cand, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
        "kl": "coarse-grained on the reference's top-K + tail bucket (lower bound of exact KL)",
    }
    return EvalReport(cand_name, ref_name, m, settings, tuple(gen_rows), _gate_class_of(candidate))


def write_json(report: EvalReport, path: str | os.PathLike, verdict: Any = None) -> None:
    d = report.to_dict()
    if verdict is not None:
        d["gate"] = verdict.to_dict()
    _atomic_write(Path(path), json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def write_markdown(report: EvalReport, path: str | os.PathLike, verdict: Any = None) -> None:
    _atomic_write(Path(path), report.to_markdown(verdict))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
