"""Eval texts: the packaged corpus and prompts (or a user's files), tokenized into windows."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np

from cellm.errors import EvalError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CORPUS = DATA_DIR / "eval_corpus.txt"
DEFAULT_PROMPTS = DATA_DIR / "prompts.txt"


def read_text(path: Optional[str | os.PathLike], default: Path) -> tuple[str, str]:
    """(text, sha256 of the bytes)."""
    p = Path(path) if path is not None else default
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise EvalError(f"cannot read {p}: {exc}") from exc
    try:
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError as exc:
        raise EvalError(f"{p} is not UTF-8 (byte {exc.start})") from exc


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped; a literal ``\\n`` is a newline."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(line.replace("\\n", "\n"))
    return out


def corpus_windows(ids: list[int], bos_id: int, window: int) -> list[np.ndarray]:
    """Split the corpus token ids into independent windows ``[bos] + chunk`` of at most ``window``
    tokens; each window scores ``len(chunk)`` next-token predictions."""
    if window < 2:
        raise EvalError(f"window={window} must be >= 2")
    if len(ids) < 1:
        raise EvalError("the eval corpus has no tokens")
    step = window - 1
    return [np.asarray([bos_id] + ids[i : i + step], dtype=np.int64) for i in range(0, len(ids), step)]
