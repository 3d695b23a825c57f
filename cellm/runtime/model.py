"""The Gemma-3 text model in numpy (float32 compute), nanoGPT style: one file, explicit names.

Shapes in comments: T = new tokens in this call, S = cached + new keys, H = hidden_size,
nh / nkv = attention / key-value heads, hd = head_dim, F = intermediate_size, V = vocab_size.

Forward (see ``shared/notes/gemma3.md``; reference: transformers ``Gemma3ForCausalLM``, eager):
  h = embed[ids] * sqrt(H)                      (normalizer as float32, like transformers)
  per layer: h += post_attn_norm(attn(input_norm(h))); h += post_ffw_norm(mlp(pre_ffw_norm(h)))
  logits = final_norm(h) @ embed.T             (tied head; optional final soft-capping)
RMSNorm multiplies by (1 + w) in float32. Attention: q/k per-head RMSNorm, RoPE (rotate-half) with
the layer kind's base and linear factor, GQA, scale query_pre_attn_scalar ** -0.5, causal mask and,
on sliding layers, the transformers window rule "key position > query position - sliding_window".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import ModelRuntimeError
from cellm.names import layer_prefix

LinearHook = Callable[[str, np.ndarray], None]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # x [..., D], w [D] -> [..., D]
    x = x.astype(np.float32, copy=False)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(var + np.float32(eps))) * (np.float32(1.0) + w)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def rope_tables(theta: float, factor: float, head_dim: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, hd] for absolute positions ``pos`` [T] (computed in float32 like transformers)."""
    exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exps, dtype=np.float32)  # [hd/2]
    inv_freq = inv_freq / np.float32(factor)
    freqs = pos.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, hd]
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x [heads, T, hd]; cos/sin [T, hd]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


@dataclasses.dataclass
class LayerCache:
    """Keys/values of one layer: k, v [nkv, capacity, hd]; entries [0, n) hold positions start..start+n-1."""

    k: np.ndarray
    v: np.ndarray
    n: int = 0
    start: int = 0

    def append(self, k_new: np.ndarray, v_new: np.ndarray) -> None:
        t = k_new.shape[1]
        if self.n + t > self.k.shape[1]:
            cap = max(2 * self.k.shape[1], self.n + t, 16)
            k = np.empty((self.k.shape[0], cap, self.k.shape[2]), np.float32)
            v = np.empty_like(k)
            k[:, : self.n] = self.k[:, : self.n]
            v[:, : self.n] = self.v[:, : self.n]
            self.k, self.v = k, v
        self.k[:, self.n : self.n + t] = k_new
        self.v[:, self.n : self.n + t] = v_new
        self.n += t

    def keep_last(self, m: int) -> None:
        """Drop all but the newest ``m`` entries (sliding layers only need window - 1 of them)."""
        if self.n > m:
            drop = self.n - m
            self.k[:, :m] = self.k[:, drop : self.n].copy()
            self.v[:, :m] = self.v[:, drop : self.n].copy()
            self.n = m
            self.start += drop


@dataclasses.dataclass
class KVState:
    """The decoding state: number of positions consumed and one cache per layer."""

    pos: int
    layers: list[LayerCache]


class GemmaModel:
    """numpy Gemma-3 causal LM implementing the ``CausalLM`` protocol."""

    def __init__(self, weights: Any, max_context: Optional[int] = None):
        self.weights = weights
        self.config: GemmaTextConfig = weights.config
        cfg = self.config
        self.max_context = int(max_context or cfg.max_position_embeddings)
        if self.max_context > cfg.max_position_embeddings:
            raise ModelRuntimeError(
                f"max_context={self.max_context} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        self.embed_scale = np.float32(math.sqrt(cfg.hidden_size))  # transformers: tensor(H**0.5).to(w dtype)
        self.description = getattr(weights, "description", "numpy")

    # ------------------------------------------------------------------ protocol
    def new_state(self) -> KVState:
        cfg = self.config
        return KVState(
            pos=0,
            layers=[
                LayerCache(
                    k=np.empty((cfg.num_key_value_heads, 0, cfg.head_dim), np.float32),
                    v=np.empty((cfg.num_key_value_heads, 0, cfg.head_dim), np.float32),
                )
                for _ in range(cfg.num_hidden_layers)
            ],
        )

    def forward(
        self, ids: np.ndarray, state: KVState, *, last_only: bool = False,
        on_linear_input: Optional[LinearHook] = None,
    ) -> np.ndarray:
        """Logits float32 [T, V] (or [1, V] with ``last_only``) for ``ids`` int64 [T]; appends to ``state``."""
        h = self.hidden(ids, state, on_linear_input=on_linear_input)  # [T, H]
        if last_only:
            h = h[-1:]
        return self.logits(h, on_linear_input=on_linear_input)

    # ------------------------------------------------------------------ pieces
    def _check(self, ids: np.ndarray, state: KVState) -> np.ndarray:
        cfg = self.config
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        t = ids.shape[0]
        if t == 0:
            raise ModelRuntimeError("forward() needs at least one token id")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= cfg.vocab_size)][0])
            raise ModelRuntimeError(f"token id {bad} outside the vocabulary [0, {cfg.vocab_size})")
        if state.pos + t > self.max_context:
            raise ModelRuntimeError(
                f"context of {state.pos + t} tokens exceeds the limit of {self.max_context} "
                f"(max_position_embeddings={cfg.max_position_embeddings})"
            )
        return ids

    def hidden(self, ids: np.ndarray, state: KVState, on_linear_input: Optional[LinearHook] = None) -> np.ndarray:
        """Final-normed hidden states [T, H] (before the LM head)."""
        ids = self._check(ids, state)
        return self._run(ids, [state], [len(ids)], on_linear_input)

    def hidden_batch(self, ids: np.ndarray, states: list[KVState]) -> np.ndarray:
        """One new token per sequence: ids [B] for ``states`` [B] -> hidden [B, H]. The matrices are
        read once for the whole batch; attention runs per sequence on its own cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(states):
            raise ModelRuntimeError(f"hidden_batch: {len(ids)} ids for {len(states)} states")
        for i, st in zip(ids, states):
            self._check(np.asarray([i]), st)
        return self._run(ids, states, [1] * len(ids), None)

    def _run(self, ids: np.ndarray, states: list[KVState], lens: list[int], hook) -> np.ndarray:
        cfg = self.config
        # segments: (first row, last row + 1, state, absolute positions of its rows)
        segs, a = [], 0
        for st, n in zip(states, lens):
            segs.append((a, a + n, st, np.arange(st.pos, st.pos + n, dtype=np.int64)))
            a += n
        pos = np.concatenate([sg[3] for sg in segs])  # [T]
        h = self.weights.embed_rows(ids) * self.embed_scale  # [T, H]
        for i in range(cfg.num_hidden_layers):
            h = self._layer(i, h, pos, segs, hook)
        for st, n in zip(states, lens):
            st.pos += n
        return rms_norm(h, self.weights.vector("model.norm.weight"), cfg.rms_norm_eps)

    def logits(self, h: np.ndarray, on_linear_input: Optional[LinearHook] = None) -> np.ndarray:
        # h [T, H] -> [T, V]
        if on_linear_input is not None:  # tied head: the embedding's name
            on_linear_input("lm_head.weight" if not self.config.tie_word_embeddings else "model.embed_tokens.weight", h)
        out = self.weights.head_logits(h)
        cap = self.config.final_logit_softcapping
        if cap:
            out = np.tanh(out / np.float32(cap)) * np.float32(cap)
        return out.astype(np.float32, copy=False)

    def _linear(self, name: str, x: np.ndarray, hook: Optional[LinearHook]) -> np.ndarray:
        # x [T, in] @ W[out, in].T -> [T, out]
        if hook is not None:
            hook(name, x)
        return x @ self.weights.matrix(name).T

    def _layer(self, i: int, h: np.ndarray, pos: np.ndarray, segs: list, hook) -> np.ndarray:
        cfg, w = self.config, self.weights
        p = layer_prefix(i)
        eps = cfg.rms_norm_eps
        x = rms_norm(h, w.vector(f"{p}.input_layernorm.weight"), eps)  # [T, H]
        a = self._attention(i, x, pos, segs, hook)  # [T, H]
        h = h + rms_norm(a, w.vector(f"{p}.post_attention_layernorm.weight"), eps)
        x = rms_norm(h, w.vector(f"{p}.pre_feedforward_layernorm.weight"), eps)  # [T, H]
        g = self._linear(f"{p}.mlp.gate_proj.weight", x, hook)  # [T, F]
        u = self._linear(f"{p}.mlp.up_proj.weight", x, hook)  # [T, F]
        m = self._linear(f"{p}.mlp.down_proj.weight", gelu_tanh(g) * u, hook)  # [T, H]
        return h + rms_norm(m, w.vector(f"{p}.post_feedforward_layernorm.weight"), eps)

    def _attention(self, i: int, x: np.ndarray, pos: np.ndarray, segs: list, hook) -> np.ndarray:
        cfg, w = self.config, self.weights
        p = f"{layer_prefix(i)}.self_attn"
        t, nh, nkv, hd = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self._linear(f"{p}.q_proj.weight", x, hook).reshape(t, nh, hd).transpose(1, 0, 2)  # [nh, T, hd]
        k = self._linear(f"{p}.k_proj.weight", x, hook).reshape(t, nkv, hd).transpose(1, 0, 2)  # [nkv, T, hd]
        v = self._linear(f"{p}.v_proj.weight", x, hook).reshape(t, nkv, hd).transpose(1, 0, 2)  # [nkv, T, hd]
        q = rms_norm(q, w.vector(f"{p}.q_norm.weight"), cfg.rms_norm_eps)
        k = rms_norm(k, w.vector(f"{p}.k_norm.weight"), cfg.rms_norm_eps)
        rope = cfg.rope_for(i)
        cos, sin = rope_tables(rope.theta, rope.factor, hd, pos)  # [T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = np.empty((t, nh * hd), np.float32)  # [T, nh*hd]
        for a, b, state, spos in segs:
            out[a:b] = self._attend(i, q[:, a:b], k[:, a:b], v[:, a:b], spos, state.layers[i])
        return self._linear(f"{p}.o_proj.weight", out, hook)  # [T, H]

    def _attend(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray,
                cache: LayerCache) -> np.ndarray:
        # one sequence: q [nh, T, hd], k/v [nkv, T, hd] (new rows), pos [T] -> [T, nh*hd]
        cfg = self.config
        nh, t, hd = q.shape
        nkv = k.shape[0]
        cache.append(k, v)
        keys, vals = cache.k[:, : cache.n], cache.v[:, : cache.n]  # [nkv, S, hd]
        kpos = np.arange(cache.start, cache.start + cache.n, dtype=np.int64)  # [S]
        allowed = kpos[None, :] <= pos[:, None]  # [T, S] causal
        sliding = cfg.is_sliding(i)
        if sliding:
            allowed &= kpos[None, :] > pos[:, None] - cfg.sliding_window
        g = nh // nkv
        qg = q.reshape(nkv, g * t, hd)  # heads of one kv group are contiguous (repeat_kv order)
        scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(cfg.attn_scale)  # [nkv, g*T, S]
        if cfg.attn_logit_softcapping:
            c = np.float32(cfg.attn_logit_softcapping)
            scores = np.tanh(scores / c) * c
        scores = scores.reshape(nkv, g, t, -1)
        scores = np.where(allowed[None, None], scores, np.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs.reshape(nkv, g * t, -1) @ vals  # [nkv, g*T, hd]
        if sliding:
            cache.keep_last(cfg.sliding_window - 1)
        return out.reshape(nh, t, hd).transpose(1, 0, 2).reshape(t, nh * hd)
