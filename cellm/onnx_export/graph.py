"""The Gemma-3 decoder as an ONNX graph, one ``make_*`` function per subgraph.

Inputs / outputs follow onnxruntime-genai's decoder conventions (its model builder's names)::

    input_ids                 int64 [batch_size, sequence_length]
    attention_mask            int64 [batch_size, total_sequence_length]
    past_key_values.{i}.key   float [batch_size, kv_heads, past_sequence_length, head_dim]  (and .value)
    logits                    float [batch_size, sequence_length, vocab_size]
    present.{i}.key           float [batch_size, kv_heads, total_sequence_length, head_dim] (and .value)

Compute is float32. Attention is ``com.microsoft.GroupQueryAttention`` (rotary inside, KV cache
in/out, ``local_window_size = sliding_window`` on sliding layers — the same "key position > query
position - window" rule as transformers). It accepts either a growing past (past and present are
different buffers: our engine's default) or one shared max-length buffer bound as both past and
present (what onnxruntime-genai does with ``past_present_share_buffer``).

Weights: quantized tensors are ``MatMulNBits`` over the stored bits (see weights.py); float
tensors are stored as float16 initializers and ``Cast`` to float32 in the graph (onnxruntime folds
the Cast into a float32 initializer when the session loads: half the bytes on disk, float32 compute).
RoPE cos/sin tables are computed from constants in the graph (folded at load, nothing on disk).

Node names are deterministic: ``/model/layers.{i}/attn/q_proj/MatMulNBits``; a node's outputs are
``{node name}/output_{j}``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Protocol, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cellm.config import GemmaTextConfig, RopeSpec
from cellm.onnx_export.weights import NBits

OPSET = 23  # RMSNormalization (23) is a standard op: onnx.checker validates every default-domain node
MS = "com.microsoft"
FloatW = np.ndarray  # float16 / float32 [N, K] (HF layout: out x in)
Weight = Union[NBits, FloatW]


class WeightSource(Protocol):
    """What the graph needs from an artifact (export.py reads a .cellm; tests may build one)."""

    config: GemmaTextConfig

    def linear(self, name: str) -> Weight: ...  # HF name of a 2-D projection

    def vector(self, name: str) -> np.ndarray: ...  # float32 1-D (norm weights, HF convention w)

    def embedding(self) -> Weight: ...  # the (tied) token embedding [V, H]


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    accuracy_level: int = 4  # MatMulNBits accuracy_level (1 = fp32, 4 = int8 activations)
    context_length: int = 0  # rows of the RoPE tables (0 -> max_position_embeddings)
    lm_head_accuracy_level: int | None = None  # None -> accuracy_level
    fp32_projections: tuple[str, ...] = ()  # projections kept at accuracy_level 1, e.g. ("o_proj", "down_proj")
    # level 4 only: every MatMulNBits gets the activations as two rows, their part on level 4's own int8
    # grid (rounded exactly) and the remainder (rounded at ~1/254 of the error): level-1 accuracy, int8 kernels
    int8_residual: bool = False

    def level(self, proj: str) -> int:
        return 1 if proj in self.fp32_projections else self.accuracy_level


class GraphBuilder:
    """Collects nodes and initializers; hands out deterministic output names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self._node_names: set[str] = set()
        self.int8_splits: dict[tuple[str, int, int], str] = {}  # (input, K, block) -> make_int8_split output

    def node(self, op: str, name: str, inputs: list[str], n_out: int = 1, *, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        if name in self._node_names:
            raise ValueError(f"duplicate node name {name!r}")
        self._node_names.add(name)
        outs = outputs if outputs is not None else [f"{name}/output_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, name: str, inputs: list[str], **kw) -> str:
        return self.node(op, name, inputs, 1, **kw)[0]

    def init(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            a = np.asarray(array)
            if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into 1-d)
                a = a.copy(order="C")
            self.initializers[name] = numpy_helper.from_array(a, name)
        return name

    def ints(self, values: list[int], scalar: bool = False) -> str:
        a = np.array(values[0] if scalar else values, dtype=np.int64)
        return self.init(f"/const/int64/{'s' if scalar else ''}{list(values)}".replace(" ", ""), a)

    def floats(self, value: float) -> str:
        return self.init(f"/const/float/{value!r}", np.array(value, dtype=np.float32))


# ---------------------------------------------------------------------------------------- helpers
def _float_weight(g: GraphBuilder, name: str, w: FloatW) -> str:
    """A float initializer as a float32 tensor name (float16 storage + Cast, folded at load)."""
    if w.dtype == np.float32:
        return g.init(name, w)
    node = f"/{name}/Cast"
    if node in g._node_names:  # shared weight (tied embedding): one initializer, one Cast
        return f"{node}/output_0"
    src = g.init(name, w.astype(np.float16, copy=False))
    return g.one("Cast", node, [src], to=TensorProto.FLOAT)


def _nbits_inputs(g: GraphBuilder, prefix: str, w: NBits) -> list[str]:
    names = [g.init(f"{prefix}.qweight", w.b), g.init(f"{prefix}.scales", w.scales)]
    if w.zero_points is not None:
        names.append(g.init(f"{prefix}.zero_points", w.zero_points))
    return names


# ------------------------------------------------------------------------------------ subgraphs
def make_attention_mask(g: GraphBuilder) -> tuple[str, str]:
    """seqlens_k and total_sequence_length (int32) for GroupQueryAttention.

        attention_mask ─► ReduceSum(axis 1) ─► Sub 1 ─► Cast int32 ─► seqlens_k        [batch]
        attention_mask ─► Shape ─► Gather[1] ─► Cast int32 ─────────► total_seq_len    scalar
    """
    p = "/model/attn_mask"
    s = g.one("ReduceSum", f"{p}/ReduceSum", ["attention_mask", g.ints([1])], keepdims=0)
    s = g.one("Sub", f"{p}/Sub", [s, g.ints([1], scalar=True)])
    seqlens = g.one("Cast", f"{p}/seqlens_k/Cast", [s], to=TensorProto.INT32)
    shape = g.one("Shape", f"{p}/Shape", ["attention_mask"])
    total = g.one("Gather", f"{p}/Gather", [shape, g.ints([1], scalar=True)], axis=0)
    total = g.one("Cast", f"{p}/total_seq_len/Cast", [total], to=TensorProto.INT32)
    return seqlens, total


def make_rope_cache(g: GraphBuilder, kind: str, rope: RopeSpec, head_dim: int, length: int) -> tuple[str, str]:
    """cos/sin tables [length, head_dim/2] for one RoPE kind, from constants (folded at load).

        Range(0, length) ─► Cast f32 ─► Unsqueeze[1] ─► Mul inv_freq[1, hd/2] ─┬─► Cos ─► cos_cache
                                                                              └─► Sin ─► sin_cache
    inv_freq = 1 / theta^(2j/hd) / factor, in float32 like transformers (linear scaling = positions/factor).
    """
    p = f"/model/rotary_{kind}"
    exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = np.float32(1.0) / np.power(np.float32(rope.theta), exps, dtype=np.float32)
    inv = (inv / np.float32(rope.factor)).astype(np.float32).reshape(1, -1)
    pos = g.one("Range", f"{p}/Range", [g.ints([0], True), g.ints([length], True), g.ints([1], True)])
    pos = g.one("Cast", f"{p}/Cast", [pos], to=TensorProto.FLOAT)
    pos = g.one("Unsqueeze", f"{p}/Unsqueeze", [pos, g.ints([1])])
    freqs = g.one("Mul", f"{p}/Mul", [pos, g.init(f"model.rotary_{kind}.inv_freq", inv)])
    return g.one("Cos", f"{p}/Cos", [freqs]), g.one("Sin", f"{p}/Sin", [freqs])


def make_embedding(g: GraphBuilder, w: Weight, hidden: int) -> str:
    """Token embedding lookup times sqrt(hidden).

    quantized:  input_ids ─► GatherBlockQuantized(Reshape(B → [V, nb*bs*bits/8]), scales, zp) ─► [Slice K] ─► Mul
    float:      input_ids ─► Gather(Cast f32(E)) ─► Mul
    The quantized table is the LM head's MatMulNBits ``B`` initializer itself (one copy on disk).
    """
    p = "/model/embed_tokens"
    if isinstance(w, NBits):
        ins = _nbits_inputs(g, "model.embed_tokens", w)
        row_bytes = w.n_blocks * w.block_size * w.bits // 8
        data = g.one("Reshape", f"{p}/Reshape", [ins[0], g.ints([w.n, row_bytes])])
        gq = [data, "input_ids", ins[1]] + ins[2:]
        x = g.one("GatherBlockQuantized", f"{p}/GatherBlockQuantized", gq, domain=MS,
                  bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=1)
        if w.n_blocks * w.block_size != w.k:  # padded last block: drop the padding columns
            x = g.one("Slice", f"{p}/Slice", [x, g.ints([0]), g.ints([w.k]), g.ints([-1])])
    else:
        table = _float_weight(g, "model.embed_tokens.weight", w)
        x = g.one("Gather", f"{p}/Gather", [table, "input_ids"], axis=0)
    scale = g.floats(float(np.float32(math.sqrt(hidden))))
    return g.one("Mul", f"{p}/Mul", [x, scale])


def _plus_one(g: GraphBuilder, hf_name: str, w: np.ndarray) -> str:
    """Gemma norms multiply by (1 + w): stored precomputed in float32 (exact for f16 w)."""
    return g.init(f"{hf_name}.plus_one", (np.float32(1.0) + w.astype(np.float32)).astype(np.float32))


def _node_prefix(hf_name: str) -> str:
    """``model.layers.3.post_attention_layernorm.weight`` -> ``/model/layers.3/post_attention_layernorm``."""
    base = hf_name.removesuffix(".weight")
    return "/" + re.sub(r"^model\.(layers\.\d+)\.", r"model/\1/", base).replace("model.norm", "model/norm")


def make_norm(g: GraphBuilder, hf_name: str, x: str, w: np.ndarray, eps: float) -> str:
    """Gemma RMSNorm ``x / sqrt(mean(x^2) + eps) * (1 + w)``."""
    return g.one("RMSNormalization", f"{_node_prefix(hf_name)}/RMSNormalization",
                 [x, _plus_one(g, hf_name, w)], axis=-1, epsilon=float(eps), stash_type=1)


def make_skip_norm(g: GraphBuilder, hf_name: str, x: str, skip: str, w: np.ndarray, eps: float) -> tuple[str, str]:
    """Residual add fused with the next RMSNorm: returns (norm(x + skip), x + skip).

        x ──┐
            ├─► SkipSimplifiedLayerNormalization(1 + w) ─┬─► output_0: normed
        skip┘                                           └─► output_3: x + skip (the new residual)
    """
    n = f"{_node_prefix(hf_name)}/SkipSimplifiedLayerNormalization"
    outs = [f"{n}/output_0", "", "", f"{n}/output_3"]
    g.node("SkipSimplifiedLayerNormalization", n, [x, skip, _plus_one(g, hf_name, w)], domain=MS, outputs=outs,
           epsilon=float(eps))
    return outs[0], outs[3]


def make_int8_split(g: GraphBuilder, p: str, x: str, k: int, block: int) -> str:
    """Activations as [hi; lo] on the batch axis: ``hi`` on level 4's int8 grid, ``lo = x - hi``.

        x [B,S,K] ─► (Pad to nb*bs) ─► Reshape [B,S,nb,bs] ─► Abs ─► ReduceMax ─► Mul 1/127 ─► Max 1e-30 ─► s
            hi = Round(x / s) * s ;  lo = x - hi ─► Concat(hi, lo; axis 0) ─► Reshape [2B,S,nb*bs] ─► (Slice K)

    Level 4 rounds each block of ``bs`` activations to int8 with the scale ``amax/127``. ``hi`` is
    already on that grid (its amax is 127 s), so it is rounded exactly; ``lo`` (|lo| <= s/2) is rounded
    with its own, ~254x finer scale. The MatMulNBits output rows are then added back (``make_linear``).
    """
    key = (x, k, block)
    if key in g.int8_splits:  # q/k/v or gate/up stored apart: one split of their shared input
        return g.int8_splits[key]
    q = f"{p}/int8_residual"
    nb = -(-k // block)
    if nb * block != k:  # padded last block: zeros change no block maximum
        x = g.one("Pad", f"{q}/Pad", [x, g.ints([0, 0, 0, 0, 0, nb * block - k])])
    xb = g.one("Reshape", f"{q}/Reshape_in", [x, g.ints([0, 0, nb, block])])
    amax = g.one("ReduceMax", f"{q}/ReduceMax", [g.one("Abs", f"{q}/Abs", [xb]), g.ints([-1])], keepdims=1)
    s = g.one("Mul", f"{q}/Mul_scale", [amax, g.floats(float(np.float32(1.0) / np.float32(127.0)))])
    s = g.one("Max", f"{q}/Max", [s, g.floats(1e-30)])  # an all-zero block: hi = lo = 0, no 0/0
    hi = g.one("Mul", f"{q}/Mul_hi", [g.one("Round", f"{q}/Round", [g.one("Div", f"{q}/Div", [xb, s])]), s])
    lo = g.one("Sub", f"{q}/Sub", [xb, hi])
    both = g.one("Concat", f"{q}/Concat", [hi, lo], axis=0)
    y = g.one("Reshape", f"{q}/Reshape_out", [both, g.ints([0, 0, nb * block])])
    if nb * block != k:
        y = g.one("Slice", f"{q}/Slice", [y, g.ints([0]), g.ints([k]), g.ints([-1])])
    g.int8_splits[key] = y
    return y


def make_linear(g: GraphBuilder, node_prefix: str, weight_name: str, x: str, w: Weight, accuracy_level: int,
                int8_residual: bool = False, output: str | None = None) -> str:
    """y = x @ W^T: MatMulNBits over stored bits, or MatMul with a float (transposed, folded) weight.

    ``int8_residual`` (level 4 only): x ─► make_int8_split ─► MatMulNBits [2B,S,N] ─► Split(axis 0) ─► Add
    """
    if isinstance(w, NBits):
        split = int8_residual and accuracy_level == 4
        xin = make_int8_split(g, node_prefix, x, w.k, w.block_size) if split else x
        y = g.node("MatMulNBits", f"{node_prefix}/MatMulNBits", [xin] + _nbits_inputs(g, weight_name, w), domain=MS,
                   outputs=None if split or output is None else [output], K=w.k, N=w.n, bits=w.bits,
                   block_size=w.block_size, accuracy_level=int(accuracy_level))[0]
        if split:
            hi, lo = g.node("Split", f"{node_prefix}/int8_residual/Split", [y], 2, axis=0, num_outputs=2)
            y = g.node("Add", f"{node_prefix}/int8_residual/Add", [hi, lo],
                       outputs=None if output is None else [output])[0]
        return y
    wt = g.one("Transpose", f"{node_prefix}/Transpose", [_float_weight(g, weight_name, w)], perm=[1, 0])
    return g.one("MatMul", f"{node_prefix}/MatMul", [x, wt])


def make_qk_norm(g: GraphBuilder, hf_name: str, x: str, w: np.ndarray, heads: int, head_dim: int, eps: float) -> str:
    """Per-head RMSNorm of q or k.

        x [B, S, heads*hd] ─► Reshape [B, S*heads, hd] ─► RMSNormalization(1 + w) ─► Reshape [B, S, heads*hd]
    """
    p = _node_prefix(hf_name).replace(".self_attn.", "/attn/").replace("/self_attn.", "/attn/")
    y = g.one("Reshape", f"{p}/Reshape_in", [x, g.ints([0, -1, head_dim])])
    y = g.one("RMSNormalization", f"{p}/RMSNormalization", [y, _plus_one(g, hf_name, w)],
              axis=-1, epsilon=float(eps), stash_type=1)
    return g.one("Reshape", f"{p}/Reshape_out", [y, g.ints([0, -1, heads * head_dim])])


def pack_rows(ws: list[Weight]) -> Weight | None:
    """Concatenate weights along N (output rows) when they share one storage layout, else None.

    Same bits/block size: B and scales concatenate; a symmetric part gets the explicit default zero
    point (8 / 128, packed) when another part is asymmetric — the same dequantized values.
    """
    if all(isinstance(w, NBits) for w in ws):
        first = ws[0]
        if any(w.bits != first.bits or w.block_size != first.block_size or w.k != first.k for w in ws):
            return None
        zps = None
        if any(w.zero_points is not None for w in ws):
            zps = []
            for w in ws:
                if w.zero_points is not None:
                    zps.append(w.zero_points)
                elif w.bits == 4:
                    zps.append(np.full((w.n, (w.n_blocks + 1) // 2), 0x88, dtype=np.uint8))
                else:
                    zps.append(np.full((w.n, w.n_blocks), 128, dtype=np.uint8))
            zps = np.concatenate(zps, axis=0)
        return NBits(sum(w.n for w in ws), first.k, first.bits, first.block_size,
                     np.concatenate([w.b for w in ws], axis=0), np.concatenate([w.scales for w in ws], axis=0), zps)
    if all(not isinstance(w, NBits) for w in ws) and len({w.dtype for w in ws}) == 1:
        return np.concatenate(ws, axis=0)
    return None


def make_attention(g: GraphBuilder, ws: WeightSource, i: int, x: str, mask: tuple[str, str],
                   rope: tuple[str, str], opts: GraphOptions) -> str:
    """One self-attention block.

        x ─► qkv_proj (q|k|v rows packed) ─► Split ─┬─► q ─► q_norm ─┐
                                                    ├─► k ─► k_norm ─┼─► GroupQueryAttention(rotary, window,
                                                    └─► v ───────────┘     past_key_values.i.*) ─► o_proj ─► out
                                                                             └─► present.i.key / .value
    When q/k/v are stored in different formats they stay three projections (no Split).
    """
    cfg = ws.config
    hf = f"model.layers.{i}.self_attn"
    p = f"/model/layers.{i}/attn"
    lvl, eps = opts.level("qkv_proj"), cfg.rms_norm_eps
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    parts = [ws.linear(f"{hf}.{n}_proj.weight") for n in "qkv"]
    packed = pack_rows(parts)
    if packed is not None:
        qkv = make_linear(g, f"{p}/qkv_proj", f"{hf}.qkv_proj.weight", x, packed, lvl, opts.int8_residual)
        q, k, v = g.node("Split", f"{p}/qkv_proj/Split", [qkv, g.ints([nh * hd, nkv * hd, nkv * hd])], 3, axis=-1)
    else:
        q, k, v = (make_linear(g, f"{p}/{n}_proj", f"{hf}.{n}_proj.weight", x, w, lvl, opts.int8_residual)
                   for n, w in zip("qkv", parts))
    q = make_qk_norm(g, f"{hf}.q_norm.weight", q, ws.vector(f"{hf}.q_norm.weight"), nh, hd, eps)
    k = make_qk_norm(g, f"{hf}.k_norm.weight", k, ws.vector(f"{hf}.k_norm.weight"), nkv, hd, eps)
    window = int(cfg.sliding_window) if cfg.is_sliding(i) else -1
    attn_in = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", mask[0], mask[1], rope[0], rope[1]]
    outs = [f"{p}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"]
    g.node("GroupQueryAttention", f"{p}/GroupQueryAttention", attn_in, domain=MS, outputs=outs,
           num_heads=nh, kv_num_heads=nkv, scale=float(cfg.attn_scale), local_window_size=window,
           do_rotary=1, rotary_interleaved=0, softcap=float(cfg.attn_logit_softcapping or 0.0))
    return make_linear(g, f"{p}/o_proj", f"{hf}.o_proj.weight", outs[0], ws.linear(f"{hf}.o_proj.weight"),
                       opts.level("o_proj"), opts.int8_residual)


def make_mlp(g: GraphBuilder, ws: WeightSource, i: int, x: str, opts: GraphOptions) -> str:
    """Gated MLP: down(gelu_tanh(gate(x)) * up(x)).

        x ─► gate_up_proj (gate|up rows packed) ─► Split ─┬─► gate ─► Gelu(tanh) ─┐
                                                          └─► up ─────────────────┴─► Mul ─► down_proj ─► out
    When gate and up are stored in different formats they stay two projections (no Split).
    """
    hf = f"model.layers.{i}.mlp"
    p = f"/model/layers.{i}/mlp"
    lvl = opts.level("gate_up_proj")
    gate_w, up_w = ws.linear(f"{hf}.gate_proj.weight"), ws.linear(f"{hf}.up_proj.weight")
    packed = pack_rows([gate_w, up_w])
    if packed is not None:
        gu = make_linear(g, f"{p}/gate_up_proj", f"{hf}.gate_up_proj.weight", x, packed, lvl, opts.int8_residual)
        n = ws.config.intermediate_size
        gate, up = g.node("Split", f"{p}/gate_up_proj/Split", [gu, g.ints([n, n])], 2, axis=-1)
    else:
        gate = make_linear(g, f"{p}/gate_proj", f"{hf}.gate_proj.weight", x, gate_w, lvl, opts.int8_residual)
        up = make_linear(g, f"{p}/up_proj", f"{hf}.up_proj.weight", x, up_w, lvl, opts.int8_residual)
    act = g.one("Gelu", f"{p}/act_fn/Gelu", [gate], approximate="tanh")
    m = g.one("Mul", f"{p}/Mul", [act, up])
    return make_linear(g, f"{p}/down_proj", f"{hf}.down_proj.weight", m, ws.linear(f"{hf}.down_proj.weight"),
                       opts.level("down_proj"), opts.int8_residual)


def make_layer(g: GraphBuilder, ws: WeightSource, i: int, residual: str, normed: str,
               mask: tuple[str, str], ropes: dict[str, tuple[str, str]], opts: GraphOptions) -> tuple[str, str]:
    """One decoder layer; takes (residual h, input_layernorm(h)), returns (h', next_norm_input pieces).

        normed ─► attention ─► post_attention_layernorm ─┐
        residual ───────────────────────────────────────┴─► Skip(pre_feedforward_layernorm) ─┬─► mlp
                                                                                           h ┘
        mlp ─► post_feedforward_layernorm ─► (returned as the skip input of the next fused norm)
    Returns (h, post_ffw_out): the caller fuses ``h + post_ffw_out`` with the next RMSNorm.
    """
    cfg = ws.config
    eps = cfg.rms_norm_eps
    hf = f"model.layers.{i}"
    kind = "local" if cfg.is_sliding(i) else "global"
    a = make_attention(g, ws, i, normed, mask, ropes[kind], opts)
    n = f"{hf}.post_attention_layernorm.weight"
    a = make_norm(g, n, a, ws.vector(n), eps)
    n = f"{hf}.pre_feedforward_layernorm.weight"
    x, h = make_skip_norm(g, n, residual, a, ws.vector(n), eps)
    m = make_mlp(g, ws, i, x, opts)
    n = f"{hf}.post_feedforward_layernorm.weight"
    m = make_norm(g, n, m, ws.vector(n), eps)
    return h, m


def make_lm_head(g: GraphBuilder, x: str, w: Weight, vocab: int, accuracy_level: int,
                 int8_residual: bool = False) -> str:
    """Tied LM head: logits = x @ E^T.

    quantized: MatMulNBits over the embedding's own initializers (shared with GatherBlockQuantized)
    float:     Reshape [B*S, H] ─► Gemm(E, transB=1) ─► Reshape [B, S, V]  (no transposed copy of E)
    """
    if isinstance(w, NBits):
        return make_linear(g, "/lm_head", "model.embed_tokens", x, w, accuracy_level, int8_residual, output="logits")
    table = _float_weight(g, "model.embed_tokens.weight", w)
    x2 = g.one("Reshape", "/lm_head/Reshape_in", [x, g.ints([-1, w.shape[1]])])
    y = g.one("Gemm", "/lm_head/Gemm", [x2, table], transB=1)
    bsz = g.one("Shape", "/lm_head/Shape", ["input_ids"], start=0, end=1)
    shape = g.one("Concat", "/lm_head/Concat", [bsz, g.ints([-1, vocab])], axis=0)
    return g.node("Reshape", "/lm_head/Reshape_out", [y, shape], outputs=["logits"])[0]


def make_io(cfg: GemmaTextConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs/outputs with onnxruntime-genai's names and symbolic dims."""
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for t in ("key", "value"):
            ins.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{t}", TensorProto.FLOAT, ["batch_size", kv, "past_sequence_length", hd]))
            outs.append(helper.make_tensor_value_info(
                f"present.{i}.{t}", TensorProto.FLOAT, ["batch_size", kv, "total_sequence_length", hd]))
    return ins, outs


def make_model(ws: WeightSource, opts: GraphOptions = GraphOptions()) -> onnx.ModelProto:
    """The full decoder:

        input_ids ─► embedding ─► norm ─► [layer 0 … L-1, residual fused into the next norm] ─► final norm ─► lm_head ─► logits
        attention_mask ─► seqlens_k / total_seq_len ─► every GroupQueryAttention
    """
    cfg = ws.config
    g = GraphBuilder()
    eps = cfg.rms_norm_eps
    mask = make_attention_mask(g)
    length = int(opts.context_length or cfg.max_position_embeddings)
    kinds = {"local" if cfg.is_sliding(i) else "global" for i in range(cfg.num_hidden_layers)}
    ropes = {k: make_rope_cache(g, k, cfg.rope_local if k == "local" else cfg.rope_global, cfg.head_dim, length)
             for k in sorted(kinds)}
    emb = ws.embedding()
    h = make_embedding(g, emb, cfg.hidden_size)
    x = make_norm(g, "model.layers.0.input_layernorm.weight", h, ws.vector("model.layers.0.input_layernorm.weight"), eps)
    for i in range(cfg.num_hidden_layers):
        h, m = make_layer(g, ws, i, h, x, mask, ropes, opts)
        n = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_hidden_layers else "model.norm.weight"
        x, h = make_skip_norm(g, n, h, m, ws.vector(n), eps)
    lm_lvl = opts.accuracy_level if opts.lm_head_accuracy_level is None else opts.lm_head_accuracy_level
    make_lm_head(g, x, emb, cfg.vocab_size, lm_lvl, opts.int8_residual)
    ins, outs = make_io(cfg)
    graph = helper.make_graph(g.nodes, "cellm-gemma3", ins, outs, list(g.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="cellm", ir_version=11)
    return model
