"""``evaluate(candidate, reference)``: teacher-forced KL / top-1 / perplexity and generation checks.

Teacher forcing: the corpus is tokenized once (no BOS) and cut into independent windows of
``window`` tokens (default 512 = the 270M's sliding window): ``<bos>`` + 511 corpus tokens, each
window scoring its 511 next-token predictions, the last window shorter. Every corpus token is
predicted exactly once. Generation checks: for each prompt (``<bos>`` + prompt), ``gen_tokens``
greedy tokens from both models (stopping at the eos ids); agreement = common-prefix length.

``evaluate`` is plan → shards → merge (:mod:`cellm.eval.shards`) run in one process; the flows run the
shards as separate tasks and get the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from cellm.atomic import atomic_write
from cellm.eval.runner import Progress

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
        if isinstance(prof, dict) and isinstance(prof.get("gate_class"), str):
            return prof["gate_class"]  # recorded by the converter (works for profile files too)
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
    shards: int = 1,
    gen_group: int = 0,
) -> EvalReport:
    """Plan → shards → merge in this process (:mod:`cellm.eval.shards`; the flows run the same three
    steps as separate tasks). The numbers do not depend on ``shards``; ``gen_group`` > 0 generates the
    prompts in batches of that many (0: all in one batch)."""
    from cellm.eval import shards as sh
    from cellm.runtime import load_model

    t_start = time.perf_counter()
    plan, stats, tok = sh.prepare(candidate, reference_source, shards, corpus=corpus, prompts=prompts,
                                  window=window, top_k=top_k, gen_tokens=gen_tokens, max_tokens=max_tokens,
                                  gen_group=gen_group, cache=cache, use_cache=use_cache, save_reference=use_cache,
                                  threads=threads, progress=progress)
    cand_obj, _ = sh._candidate(candidate)
    cand = cand_obj if hasattr(cand_obj, "forward") else load_model(cand_obj, threads=threads)
    results = [sh.run_shard(cand, plan, i, stats=stats, progress=progress) for i in range(len(plan.shards))]
    report = sh.merge_eval_shards(plan, results, stats=stats, tokenizer=tok)
    return dataclasses.replace(report, settings={**report.settings,
                                                 "total_seconds": round(time.perf_counter() - t_start, 2)})


def write_json(report: EvalReport, path: str | os.PathLike, verdict: Any = None) -> None:
    d = report.to_dict()
    if verdict is not None:
        d["gate"] = verdict.to_dict()
    _atomic_write(Path(path), json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def write_markdown(report: EvalReport, path: str | os.PathLike, verdict: Any = None) -> None:
    _atomic_write(Path(path), report.to_markdown(verdict))


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
