"""Calibration statistics: per-weight input second moments ``H = X^T X / n`` on the calibration text.

The calibration text (``cellm/data/calibration.txt``) is written for this project and shares no
8-gram with the eval corpus (a test checks it). It is tokenized with the source's tokenizer, cut
into windows of ``window`` tokens (each starting with ``<bos>``), and run through the float32
reference (``cellm.quality.engine``); every 2-D weight matmul reports its input and we accumulate
``X^T X`` (float64) per INPUT (q/k/v share one input, as do gate/up). The tied embedding's entry
(``model.embed_tokens.weight``) is the LM-head input: the final-normed hidden states.

Cached per source content hash and calibration text hash under
``$CELLM_CACHE/quality/<source-hash>/calib-<text-hash>-w<window>.npz`` (or ``~/.cache/cellm``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cellm.errors import CellmError
from cellm.quality.engine import EMBED, Engine

DEFAULT_WINDOW = 256
MAX_WINDOWS = 16  # at most 16 x 256 tokens (the 270M's tokenizer gives 11 windows of the text)
STATS_VERSION = 1


def data_text(name: str) -> str:
    return (resources.files("cellm") / "data" / name).read_text(encoding="utf-8")


def calibration_text() -> str:
    return data_text("calibration.txt")


def quality_cache_dir(source_hash: str, cache_dir: str | os.PathLike | None = None) -> Path:
    from cellm.sources.cache import cache_root

    return cache_root(cache_dir or None) / "quality" / source_hash[:16]


def windows(ids: list[int], window: int, bos: int, max_windows: int | None = None) -> np.ndarray:
    """Token windows [B, window]: each ``<bos>`` + window-1 consecutive tokens (no overlap)."""
    body = [i for i in ids if i != bos]
    step = window - 1
    n = len(body) // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CellmError(f"text too short: {len(body)} tokens for one window of {window}")
    out = np.empty((n, window), dtype=np.int64)
    out[:, 0] = bos
    for b in range(n):
        out[b, 1:] = body[b * step:(b + 1) * step]
    return out


def tokenize_windows(tokenizer_json: Any, text: str, window: int = DEFAULT_WINDOW,
                     max_windows: int | None = None) -> np.ndarray:
    from cellm.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_any(tokenizer_json, "calibration tokenizer")
    bos = tok.bos_id if tok.bos_id is not None else 2
    return windows(tok.encode(text, add_bos=False), window, bos, max_windows)


def input_key(name: str) -> str:
    """Weights that read the same input share one statistic."""
    for a, b in (("self_attn.k_proj", "self_attn.q_proj"), ("self_attn.v_proj", "self_attn.q_proj"),
                 ("mlp.up_proj", "mlp.gate_proj")):
        if a in name:
            return name.replace(a, b)
    return name


@dataclasses.dataclass
class CalibrationStats:
    """``xtx[input_key]`` = X^T X / n (float32 [K, K]); ``n_tokens``; ``key`` (provenance hash)."""

    xtx: dict[str, np.ndarray]
    n_tokens: int
    key: str

    def hessian(self, tensor_name: str) -> np.ndarray:
        return self.xtx[input_key(tensor_name)]

    def importance(self, tensor_name: str) -> np.ndarray:
        return np.diag(self.hessian(tensor_name)).copy()

    def __contains__(self, tensor_name: str) -> bool:
        return input_key(tensor_name) in self.xtx

    def save(self, path: Path) -> None:
        from cellm.atomic import atomic_write

        atomic_write(path, lambda f: np.savez(
            f, __n_tokens=np.int64(self.n_tokens), __key=np.array(self.key),
            **{k.replace(".", "|"): v for k, v in self.xtx.items()}))

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        with np.load(path) as z:
            xtx = {k.replace("|", "."): z[k] for k in z.files if not k.startswith("__")}
            return cls(xtx=xtx, n_tokens=int(z["__n_tokens"]), key=str(z["__key"]))


def collect(engine: Engine, ids: np.ndarray, batch: int = 4) -> CalibrationStats:
    """Run the reference on token windows ``ids`` [B, T] and accumulate X^T X per input."""
    acc: dict[str, np.ndarray] = {}

    def hook(name: str, x: np.ndarray) -> None:
        key = input_key(name)
        if key != name:
            return  # same input as an already counted weight
        x2 = x.reshape(-1, x.shape[-1])
        g = (x2.T @ x2).astype(np.float64)
        if key in acc:
            acc[key] += g
        else:
            acc[key] = g

    n = 0
    for b0 in range(0, ids.shape[0], batch):
        chunk = ids[b0:b0 + batch]
        final = engine.hidden(chunk, hook=hook)
        hook(EMBED, final)
        n += chunk.size
    xtx = {k: (v / n).astype(np.float32) for k, v in acc.items()}
    return CalibrationStats(xtx=xtx, n_tokens=n, key="")


def stats_key(source_hash: str, text: str, window: int) -> str:
    h = hashlib.sha256()
    for part in (f"v{STATS_VERSION}", source_hash, str(window), text):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def load_weights(ckpt: Any) -> dict[str, np.ndarray]:
    return {n: np.asarray(ckpt.load(n), dtype=np.float32) for n in ckpt.tensor_names()}


def calibration_stats(ckpt: Any, engine: Engine | None = None, *, text: str | None = None,
                      window: int = DEFAULT_WINDOW, cache_dir: str | os.PathLike | None = None,
                      use_cache: bool = True) -> CalibrationStats:
    """Calibration statistics of a source ``Checkpoint`` (cached per source and text)."""
    text = calibration_text() if text is None else text
    key = stats_key(ckpt.content_hash, text, window)
    path = quality_cache_dir(ckpt.content_hash, cache_dir) / f"calib-{key[:16]}.npz"
    if use_cache and path.is_file():
        try:
            st = CalibrationStats.load(path)
            if st.key == key:
                return st
        except (OSError, ValueError, KeyError):
            pass
    if engine is None:
        engine = Engine(ckpt.config, load_weights(ckpt))
    ids = tokenize_windows(ckpt.tokenizer_json, text, window, MAX_WINDOWS)
    st = collect(engine, ids)
    st.key = key
    if use_cache:
        st.save(path)
    return st


def stats_from_mapping(xtx: Mapping[str, np.ndarray], n_tokens: int = 0) -> CalibrationStats:
    return CalibrationStats(xtx=dict(xtx), n_tokens=n_tokens, key="")
