"""numpy reference runtime for Gemma-3 ``.cellm`` files (and source checkpoints, in float32).

``CausalLM`` protocol (implemented by :class:`cellm.runtime.model.GemmaModel` and by the onnxruntime
engine in ``cellm.onnx_export.engine``)::

    model.config                      # GemmaTextConfig
    state = model.new_state()
    logits = model.forward(ids, state) # ids int64 [T] -> float32 [T, V]; appends to the KV state

``load_model(x)`` accepts a ``.cellm`` path, a source spec / HF-layout directory (the float32,
unquantized reference), a ``Checkpoint`` or an already-built model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import CellmError, ModelRuntimeError

RUNTIME_VERSION = "1"  # bump when numerics change (keys the eval reference cache)


@runtime_checkable
class CausalLM(Protocol):
    config: GemmaTextConfig

    def new_state(self) -> Any: ...

    def forward(self, ids: np.ndarray, state: Any) -> np.ndarray: ...


def _check_cellm_architecture(path: Path) -> None:
    """Reject another architecture with a clear message before building anything."""
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(10)
        if len(head) < 10 or head[:5] != b"CELLM":
            raise ModelRuntimeError(f"{path} is not a .cellm file (magic {head[:5]!r}, expected b'CELLM')")
        (hlen,) = struct.unpack("<I", head[6:10])
        if hlen > 1 << 28:
            raise ModelRuntimeError(f"{path}: header length {hlen} exceeds {1 << 28}")
        try:
            header = json.loads(f.read(hlen).decode("utf-8"))
        except ValueError as exc:
            raise ModelRuntimeError(f"{path}: unreadable header: {exc}") from exc
    mt = str(header.get("model_type", ""))
    src = header.get("source_text_config") or {}
    smt = str(src.get("model_type", "")) if isinstance(src, dict) else ""
    if not (mt.startswith("gemma3") or smt.startswith("gemma3")):
        raise ModelRuntimeError(
            f"{path}: model_type={mt!r} is not supported by the numpy runtime (supported: gemma3, gemma3_text)"
        )


def load_model(
    path_or_source: Any,
    threads: Optional[int] = None,
    *,
    max_context: Optional[int] = None,
    cache: str = "f32",
    preload: bool = False,
):
    """Build the numpy model for a ``.cellm`` file, a source spec/dir, a Checkpoint or pass a model through.

    ``cache`` (``.cellm`` only): ``"f32"`` keeps a float32 copy of every tensor (fastest; ~4 bytes per
    parameter), ``"layers"`` caches the decoder matrices but dequantizes the tied embedding/LM head
    block-wise per call, ``"none"`` dequantizes everything per call (lowest memory, slowest).
    ``preload`` dequantizes up front and releases the file pages."""
    from cellm.runtime.model import GemmaModel
    from cellm.runtime.threads import set_blas_threads
    from cellm.runtime.weights import CellmWeights, checkpoint_weights

    set_blas_threads(threads)
    x = path_or_source
    if hasattr(x, "forward") and hasattr(x, "new_state"):
        return x
    if hasattr(x, "load") and hasattr(x, "config"):  # a source Checkpoint
        return GemmaModel(checkpoint_weights(x), max_context=max_context)
    p = Path(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else None
    if p is not None and p.is_file() and p.suffix != ".gguf":
        _check_cellm_architecture(p)
        from cellm.format.reader import CellmReader

        try:
            reader = CellmReader(p)
        except CellmError as exc:
            raise ModelRuntimeError(f"cannot open {p}: {exc}") from exc
        weights = CellmWeights(reader, cache=cache)
        if preload:
            weights.preload()
        model = GemmaModel(weights, max_context=max_context)
        model.path = p
        return model
    from cellm.sources import open_source

    ckpt = open_source(str(x))
    return GemmaModel(checkpoint_weights(ckpt), max_context=max_context)


__all__ = ["CausalLM", "load_model", "RUNTIME_VERSION"]
