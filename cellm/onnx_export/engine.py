"""onnxruntime engine for an exported folder, implementing the ``CausalLM`` protocol.

``load_ort_model(dir, threads=None)`` -> :class:`OrtCausalLM` with ``.config``, ``.new_state()``
and ``.forward(ids int64[T], state) -> float32[T, V]`` (appends to the state), like the numpy
runtime, so ``cellm.runtime.generate`` drives it unchanged.

The KV cache lives in onnxruntime-owned buffers: each layer has one max-length key and value
buffer bound (IOBinding) as both ``past_key_values.i.*`` and ``present.i.*`` — the
``past_present_share_buffer`` mode GroupQueryAttention supports — so a decode step copies nothing.
Buffers start at ``initial_capacity`` positions and double (one copy) when a call would overflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import ModelRuntimeError

DEFAULT_THREADS = 2
INITIAL_CAPACITY = 256


@dataclasses.dataclass
class OrtState:
    """Decoding state: positions consumed and per-layer (key, value) OrtValues of ``capacity`` rows."""

    pos: int
    capacity: int
    kv: list  # list[tuple[OrtValue, OrtValue]], each [1, kv_heads, capacity, head_dim]


def _config_from_dir(d: Path) -> tuple[GemmaTextConfig, int]:
    """The model config and the export's context length (rows of its RoPE tables)."""
    meta = d / "cellm_config.json"
    if not meta.is_file():
        raise ModelRuntimeError(f"{d} has no cellm_config.json (not a cellm ONNX export)")
    try:
        raw = json.loads(meta.read_text("utf-8"))
        cfg = GemmaTextConfig.from_hf(raw)
        ctx = int((raw.get("cellm_export") or {}).get("context_length") or cfg.max_position_embeddings)
    except (ValueError, OSError, TypeError) as exc:
        raise ModelRuntimeError(f"{meta}: {exc}") from exc
    return cfg, min(ctx, cfg.max_position_embeddings)


class OrtCausalLM:
    """A cellm ONNX export run by onnxruntime (CPU by default)."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, *,
                 providers: Optional[list] = None, initial_capacity: int = INITIAL_CAPACITY, spin: bool = True):
        import onnxruntime as ort

        self.path = Path(os.fspath(path))
        model_file = self.path / "model.onnx"
        if not model_file.is_file():
            raise ModelRuntimeError(f"{self.path} has no model.onnx")
        self.config, context = _config_from_dir(self.path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or DEFAULT_THREADS)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not spin:  # idle intra-op threads sleep instead of spinning (when numpy shares the cores)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_file), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelRuntimeError(f"onnxruntime cannot load {model_file}: {exc}") from exc
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.initial_capacity = int(initial_capacity)
        self.max_context = context
        self.description = f"onnxruntime ({self.path.name})"

    # ------------------------------------------------------------------ protocol
    def new_state(self) -> OrtState:
        return OrtState(pos=0, capacity=0, kv=[])

    def forward(self, ids: np.ndarray, state: OrtState, *, last_only: bool = False) -> np.ndarray:
        """Logits float32 [T, V] (or [1, V] with ``last_only``) for ``ids`` int64 [T]; appends to ``state``."""
        import onnxruntime as ort

        cfg = self.config
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        t = int(ids.shape[0])
        if t == 0:
            raise ModelRuntimeError("forward() needs at least one token id")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= cfg.vocab_size)][0])
            raise ModelRuntimeError(f"token id {bad} outside the vocabulary [0, {cfg.vocab_size})")
        total = state.pos + t
        if total > self.max_context:
            raise ModelRuntimeError(
                f"context of {total} tokens exceeds the limit of {self.max_context} "
                f"(the export's context_length; max_position_embeddings={cfg.max_position_embeddings})"
            )
        if total > state.capacity:
            self._grow(state, total)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids.reshape(1, t))
        io.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        io.bind_output("logits", self.device)  # first: get_outputs() follows binding order
        for i, (k, v) in enumerate(state.kv):
            io.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            io.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            io.bind_ortvalue_output(f"present.{i}.key", k)
            io.bind_ortvalue_output(f"present.{i}.value", v)
        self.session.run_with_iobinding(io)
        state.pos = total
        out = io.get_outputs()[0].numpy().reshape(t, cfg.vocab_size)
        return (out[-1:] if last_only else out).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ cache
    def _grow(self, state: OrtState, needed: int) -> None:
        import onnxruntime as ort

        cfg = self.config
        cap = max(self.initial_capacity, state.capacity)
        while cap < needed:
            cap *= 2
        cap = min(cap, self.max_context)
        shape = (1, cfg.num_key_value_heads, cap, cfg.head_dim)
        new = []
        for i in range(cfg.num_hidden_layers):
            pair = []
            for j in range(2):
                buf = np.zeros(shape, dtype=np.float32)
                if state.kv:
                    buf[:, :, : state.pos] = state.kv[i][j].numpy()[:, :, : state.pos]
                pair.append(ort.OrtValue.ortvalue_from_numpy(buf, self.device, 0))
            new.append(tuple(pair))
        state.kv = new
        state.capacity = cap


def load_ort_model(path: str | os.PathLike, threads: Optional[int] = None, **kw: Any) -> OrtCausalLM:
    """Open an export folder written by ``export_onnx`` (model.onnx + cellm_config.json)."""
    return OrtCausalLM(path, threads, **kw)
