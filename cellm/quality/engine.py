"""A batched, layer-resumable Gemma-3 forward for fake-quant quality measurements (float32 numpy).

The runtime (``cellm.runtime``) runs one sequence with a KV cache; quality work runs the SAME
arithmetic (it reuses the runtime's rms_norm / gelu / RoPE primitives) on a fixed batch of
calibration windows without a cache, keeps every layer's input hidden state of the reference run,
and can restart from any layer: measuring "only tensor X of layer L quantized" then costs the layers
from L on plus the LM head, not a whole forward.

``Engine(cfg, weights)``: ``weights`` maps HF names to float32 arrays (the unquantized reference or
fake-quantized copies). ``hidden(ids, start=0, h=None, overrides=None, hook=None)`` returns the
final-normed hidden states [B, T, H]; ``overrides`` replaces individual weights for that call.
``Reference`` caches the reference log-probabilities and per-layer inputs and measures mean KL /
top-1 agreement of a perturbed run.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.runtime.model import apply_rope, gelu_tanh, rms_norm, rope_tables

Hook = Callable[[str, np.ndarray], None]
EMBED = "model.embed_tokens.weight"
_VOCAB_CHUNK = 1 << 15


class Engine:
    def __init__(self, cfg: GemmaTextConfig, weights: Mapping[str, np.ndarray]):
        self.cfg = cfg
        self.w = dict(weights)
        self._rope: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _get(self, name: str, overrides: Optional[Mapping[str, np.ndarray]]) -> np.ndarray:
        if overrides is not None and name in overrides:
            return overrides[name]
        return self.w[name]

    def _tables(self, layer: int, t: int):
        spec = self.cfg.rope_for(layer)
        key = (int(self.cfg.is_sliding(layer)), t)
        if key not in self._rope:
            self._rope[key] = rope_tables(spec.theta, spec.factor, self.cfg.head_dim, np.arange(t))
        return self._rope[key]

    def embed(self, ids: np.ndarray, overrides=None) -> np.ndarray:
        e = self._get(EMBED, overrides)
        return e[ids] * np.float32(math.sqrt(self.cfg.hidden_size))

    def layer(self, i: int, h: np.ndarray, overrides=None, hook: Optional[Hook] = None) -> np.ndarray:
        """h [B, T, H] -> [B, T, H] (returns a new array)."""
        cfg = self.cfg
        p = f"model.layers.{i}"
        b, t, d = h.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        g = lambda n: self._get(f"{p}.{n}", overrides)  # noqa: E731

        def lin(name: str, x2: np.ndarray) -> np.ndarray:
            if hook is not None:
                hook(f"{p}.{name}", x2)
            return x2 @ g(name).T

        x = rms_norm(h, g("input_layernorm.weight"), eps).reshape(b * t, d)
        q = lin("self_attn.q_proj.weight", x).reshape(b, t, nh, hd)
        k = lin("self_attn.k_proj.weight", x).reshape(b, t, nkv, hd)
        v = lin("self_attn.v_proj.weight", x).reshape(b, t, nkv, hd)
        q = rms_norm(q, g("self_attn.q_norm.weight"), eps).transpose(0, 2, 1, 3)  # [B, nh, T, hd]
        k = rms_norm(k, g("self_attn.k_norm.weight"), eps).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        cos, sin = self._tables(i, t)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        rep = nh // nkv
        qg = q.reshape(b, nkv, rep * t, hd)
        s = (qg @ k.transpose(0, 1, 3, 2)).reshape(b, nkv, rep, t, t) * np.float32(cfg.attn_scale)
        qi = np.arange(t)[:, None]
        ki = np.arange(t)[None, :]
        mask = ki > qi
        if cfg.is_sliding(i):
            mask |= ki <= qi - cfg.sliding_window
        s = np.where(mask, np.float32(-np.inf), s)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o = (s.reshape(b, nkv, rep * t, t) @ v).reshape(b, nh, t, hd)
        o = o.transpose(0, 2, 1, 3).reshape(b * t, nh * hd)
        a = lin("self_attn.o_proj.weight", o).reshape(b, t, d)
        h = h + rms_norm(a, g("post_attention_layernorm.weight"), eps)
        x = rms_norm(h, g("pre_feedforward_layernorm.weight"), eps).reshape(b * t, d)
        gt = lin("mlp.gate_proj.weight", x)
        up = lin("mlp.up_proj.weight", x)
        m = lin("mlp.down_proj.weight", gelu_tanh(gt) * up).reshape(b, t, d)
        return h + rms_norm(m, g("post_feedforward_layernorm.weight"), eps)

    def hidden(self, ids: np.ndarray, start: int = 0, h: Optional[np.ndarray] = None, overrides=None,
               hook: Optional[Hook] = None, keep: Optional[list] = None) -> np.ndarray:
        """Final-normed hidden states [B, T, H]; ``start``/``h`` resume at layer ``start`` with its
        input ``h``; ``keep`` (a list) receives every layer's input."""
        if h is None:
            h = self.embed(ids, overrides)
            start = 0
        for i in range(start, self.cfg.num_hidden_layers):
            if keep is not None:
                keep.append(h)
            h = self.layer(i, h, overrides, hook)
        return rms_norm(h, self._get("model.norm.weight", overrides), self.cfg.rms_norm_eps)


def log_softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


class Reference:
    """Reference run on fixed token windows ``ids`` [B, T]: per-layer inputs, log-probs (f32: f16
    log-probs would bias KLs of int8 size)."""

    def __init__(self, engine: Engine, ids: np.ndarray, row_chunk: int = 128):
        self.engine = engine
        self.ids = np.asarray(ids, dtype=np.int64)
        self.layer_inputs: list[np.ndarray] = []
        hf = engine.hidden(self.ids, keep=self.layer_inputs)
        self.final = hf.reshape(-1, hf.shape[-1])
        self.row_chunk = row_chunk
        emb = engine.w[EMBED]
        n = self.final.shape[0]
        self.logp = np.empty((n, emb.shape[0]), dtype=np.float32)
        self.top1 = np.empty(n, dtype=np.int64)
        for r0 in range(0, n, row_chunk):
            lp = log_softmax_rows(self.final[r0:r0 + row_chunk] @ emb.T)
            self.top1[r0:r0 + row_chunk] = lp.argmax(axis=1)
            self.logp[r0:r0 + row_chunk] = lp

    @property
    def n_tokens(self) -> int:
        return self.final.shape[0]

    def compare(self, final: np.ndarray, head: Optional[np.ndarray] = None) -> tuple[float, float]:
        """(mean KL(ref || q), top-1 agreement) of final-normed hidden ``final`` with LM head ``head``."""
        head = self.engine.w[EMBED] if head is None else head
        final = final.reshape(-1, final.shape[-1])
        kl = 0.0
        agree = 0
        for r0 in range(0, final.shape[0], self.row_chunk):
            lq = log_softmax_rows(final[r0:r0 + self.row_chunk] @ head.T)
            lp = self.logp[r0:r0 + self.row_chunk]
            p = np.exp(lp)
            kl += float((p * (lp - lq)).sum(dtype=np.float64))
            agree += int((lq.argmax(axis=1) == self.top1[r0:r0 + self.row_chunk]).sum())
        n = final.shape[0]
        return kl / n, agree / n

    def measure(self, overrides: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """KL / top-1 with some weights replaced (resuming at the first affected layer)."""
        start = self.engine.cfg.num_hidden_layers
        emb_changed = EMBED in overrides
        for name in overrides:
            if name.startswith("model.layers."):
                start = min(start, int(name.split(".")[2]))
        if emb_changed:
            final = self.engine.hidden(self.ids, overrides=overrides)
        elif start < self.engine.cfg.num_hidden_layers:
            final = self.engine.hidden(self.ids, start=start, h=self.layer_inputs[start], overrides=overrides)
        else:
            final = self.final
        return self.compare(final, overrides.get(EMBED))
