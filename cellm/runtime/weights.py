"""Weight providers for the numpy runtime.

A provider hands the model float32 arrays by HF tensor name:

* ``matrix(name)`` – a 2-D weight ``[out, in]`` (float32, possibly a cached dequantized copy),
* ``vector(name)`` – a 1-D norm weight (float32, HF convention ``w``; the model applies ``1 + w``),
* ``embedding()`` – the ``[vocab, hidden]`` table, also the tied LM head.

Providers:

* :class:`DenseWeights` – from an in-memory ``{name: array}`` mapping (synthetic weights, tests).
* :func:`checkpoint_weights` – every tensor of a source :class:`Checkpoint` read as float32: the
  unquantized reference.
* :class:`CellmWeights` – a ``.cellm`` file opened through :class:`cellm.format.reader.CellmReader`
  (mmap). Every stored dtype (f16, i8, i4, q4g*) is dequantized by the reader's own scheme code.

Why the ``.cellm`` provider keeps *float32* copies by default: numpy has no fast half-precision or
integer matrix product (an f16 ``matmul`` in numpy is ~20x slower than float32 BLAS, and an f16->f32
cast of the 262144x640 tied head costs ~0.4 s), so converting per call makes decoding 10-50x
slower. ``cache="f32"`` dequantizes each tensor once on first use and keeps it; ``cache="none"``
dequantizes per call (minimum memory, slow: for checks on machines with little RAM). Measured
trade-offs are in ``docs/QUALITY.md`` (speed section).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import ModelRuntimeError
from cellm.names import expected_tensors

EMBED = "model.embed_tokens.weight"
CACHE_MODES = ("f32", "layers", "none")
HEAD_ROWS = 8192  # vocabulary rows dequantized per block when the head is not cached


def check_names(cfg: GemmaTextConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Every tensor ``expected_tensors(cfg)`` names must exist with exactly that shape."""
    for name, shape in expected_tensors(cfg).items():
        if name not in shapes:
            raise ModelRuntimeError(f"{where}: missing tensor {name!r} (expected shape {list(shape)})")
        got = tuple(int(s) for s in shapes[name])
        if got != tuple(shape):
            raise ModelRuntimeError(
                f"{where}: tensor {name!r} has shape {list(got)}; config requires {list(shape)}"
            )


class DenseWeights:
    """float32 arrays in memory (name -> array)."""

    def __init__(self, config: GemmaTextConfig, arrays: Mapping[str, np.ndarray], where: str = "weights"):
        check_names(config, {k: tuple(np.shape(v)) for k, v in arrays.items()}, where)
        self.config = config
        self._a = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        self.description = f"{where} (float32)"

    def matrix(self, name: str) -> np.ndarray:
        return self._a[name]

    def vector(self, name: str) -> np.ndarray:
        return self._a[name]

    def embedding(self) -> np.ndarray:
        return self._a[EMBED]

    def lm_head(self) -> np.ndarray:
        return self._a.get("lm_head.weight", self._a[EMBED])

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._a[EMBED][ids]

    def head_logits(self, h: np.ndarray) -> np.ndarray:
        return h @ self.lm_head().T


def checkpoint_weights(ckpt: Any) -> DenseWeights:
    """The unquantized reference: every tensor of a source checkpoint as float32."""
    cfg = ckpt.config
    arrays = {name: np.asarray(ckpt.load(name), dtype=np.float32) for name in expected_tensors(cfg)}
    return DenseWeights(cfg, arrays, where=f"checkpoint {getattr(ckpt, 'name', ckpt)}")


class CellmWeights:
    """Weights read from a ``.cellm`` reader; dequantized once (``cache='f32'``) or per call."""

    def __init__(self, reader: Any, cache: str = "f32"):
        if cache not in CACHE_MODES:
            raise ModelRuntimeError(f"cache={cache!r} must be one of {', '.join(CACHE_MODES)}")
        self.reader = reader
        self.config: GemmaTextConfig = reader.config
        check_names(self.config, {n: tuple(t.shape) for n, t in reader.tensors.items()}, str(reader.path if hasattr(reader, "path") else "cellm"))
        self._cache: dict[str, np.ndarray] = {}
        self._mode = cache
        self._lock = threading.Lock()
        self.description = f"{getattr(reader, 'path', 'cellm')} (dequantized, cache={cache})"

    def _cached(self, name: str) -> bool:
        if self._mode == "f32":
            return True
        if self._mode == "layers":
            return name not in (EMBED, "lm_head.weight")
        return False

    def _get(self, name: str) -> np.ndarray:
        a = self._cache.get(name)
        if a is not None:
            return a
        try:
            a = np.ascontiguousarray(self.reader.dequantize(name), dtype=np.float32)
        except Exception as exc:  # reader errors are FormatErrors; keep the tensor name
            raise ModelRuntimeError(f"cannot read tensor {name!r}: {exc}") from exc
        if self._cached(name):
            with self._lock:
                self._cache[name] = a
        return a

    def matrix(self, name: str) -> np.ndarray:
        return self._get(name)

    def vector(self, name: str) -> np.ndarray:
        return self._get(name)

    def embedding(self) -> np.ndarray:
        return self._get(EMBED)

    def lm_head(self) -> np.ndarray:
        return self._get("lm_head.weight" if "lm_head.weight" in self.reader.tensors else EMBED)

    def _head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.reader.tensors else EMBED

    def _rows(self, name: str, a: int, b: int) -> np.ndarray:
        """float32 rows [a, b) of a 2-D tensor, dequantized from storage (every v1/q4g layout is row-major)."""
        from cellm.quant.schemes import dequantize_parts

        t = self.reader.tensors[name]
        parts = self.reader.scheme_parts(name)
        return dequantize_parts(t.dtype, {k: v[a:b] for k, v in parts.items()}, (b - a,) + tuple(t.shape[1:]))

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        if self._cached(EMBED) or EMBED in self._cache:
            return self._get(EMBED)[ids]
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = np.concatenate([self._rows(EMBED, int(i), int(i) + 1) for i in uniq])
        return rows[inv]

    def head_logits(self, h: np.ndarray) -> np.ndarray:
        # h [T, H] -> [T, V]; uncached: dequantize HEAD_ROWS vocabulary rows at a time
        name = self._head_name()
        if self._cached(name):
            return h @ self._get(name).T
        v = self.reader.tensors[name].shape[0]
        out = np.empty((h.shape[0], v), np.float32)
        for a in range(0, v, HEAD_ROWS):
            b = min(a + HEAD_ROWS, v)
            out[:, a:b] = h @ self._rows(name, a, b).T
        return out

    def preload(self) -> None:
        """Dequantize every cached tensor now, then drop the file pages from this process's RSS
        (the float32 copies are what is used from here on)."""
        for name in expected_tensors(self.config):
            if self._cached(name):
                self._get(name)
        mm = getattr(getattr(self.reader, "_mm", None), "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            import mmap as _mmap

            try:
                mm.madvise(_mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass
