"""Synthetic Gemma-3 checkpoints in Hugging Face layout, for tests and benchmarks.

``make_checkpoint(dir, cfg)`` writes ``config.json``, ``model.safetensors`` (f32 or bf16, random
weights with a deterministic seed), ``tokenizer.json`` (a tiny Gemma-style byte-fallback BPE vocab
with the real special-token ids) and ``tokenizer_config.json``. ``tiny_config()`` is the default
small config (2 sliding + 1 full layer style pattern, GQA, query_pre_attn_scalar != head_dim) and
``gemma3_1b_config()`` has gemma-3-1b-it's exact shapes (for the convert benchmark).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from cellm.config import FULL, SLIDING, GemmaTextConfig, RopeSpec
from cellm.names import expected_tensors

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 105: "<start_of_turn>", 106: "<end_of_turn>"}


def tiny_config(**overrides) -> GemmaTextConfig:
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_global=RopeSpec(1_000_000.0),
        rope_local=RopeSpec(10_000.0),
        sliding_window=8,
        layer_types=(SLIDING, SLIDING, FULL),
        query_pre_attn_scalar=24.0,
        max_position_embeddings=256,
    )
    base.update(overrides)
    return GemmaTextConfig(**base)


def gemma3_270m_config() -> GemmaTextConfig:
    return GemmaTextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
        rope_global=RopeSpec(1_000_000.0), rope_local=RopeSpec(10_000.0), sliding_window=512,
        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18)),
        query_pre_attn_scalar=256.0, max_position_embeddings=32768,
    )


def gemma3_1b_config() -> GemmaTextConfig:
    return GemmaTextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
        rope_global=RopeSpec(1_000_000.0), rope_local=RopeSpec(10_000.0), sliding_window=512,
        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(26)),
        query_pre_attn_scalar=256.0, max_position_embeddings=32768,
    )


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16, returned as uint16 bit patterns."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Minimal streaming safetensors writer (supports F32, F16 and BF16 from f32 arrays)."""
    names = sorted(tensors)
    width = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for n in names:
        nbytes = int(np.prod(tensors[n].shape)) * width
        header[n] = {"dtype": dtype, "shape": list(tensors[n].shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            a = np.asarray(tensors[n], dtype=np.float32)
            if dtype == "F32":
                f.write(a.astype("<f4").tobytes())
            elif dtype == "F16":
                f.write(a.astype("<f2").tobytes())
            else:
                f.write(_f32_to_bf16_bits(a).astype("<u2").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def random_weights(cfg: GemmaTextConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if len(shape) == 1:  # norms: HF convention stores w, the runtime uses (1 + w)
            out[name] = rng.normal(0.0, 0.1, size=shape).astype(np.float32)
        elif name.endswith("embed_tokens.weight"):
            out[name] = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
        else:
            out[name] = (rng.normal(0.0, 1.0, size=shape) / np.sqrt(shape[1])).astype(np.float32)
    return out


def tiny_tokenizer_json(vocab_size: int) -> dict:
    """A Gemma-style tokenizer.json: Replace(' ' -> '▁') normalizer, BPE with byte fallback."""
    if vocab_size < 107 + 256 + 1:
        raise ValueError(f"vocab_size={vocab_size} too small for a Gemma-style vocab (min 364)")
    vocab: dict[str, int] = {}
    for i in range(107):
        vocab[SPECIAL.get(i, f"<unused{i}>")] = i
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 107 + b
    nxt = 107 + 256
    pieces = ["▁"] + [chr(c) for c in range(33, 127)] + ["▁" + chr(c) for c in range(97, 123)]
    merges = []
    for p in pieces:
        if nxt >= vocab_size:
            break
        if p not in vocab:
            vocab[p] = nxt
            nxt += 1
            if len(p) == 2:
                merges.append([p[0], p[1]])
    while nxt < vocab_size:
        vocab[f"<extra{nxt}>"] = nxt
        nxt += 1
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in SPECIAL.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def make_checkpoint(
    path: str | os.PathLike,
    cfg: GemmaTextConfig | None = None,
    *,
    seed: int = 0,
    dtype: str = "F32",
    config_style: int = 5,
    weights: dict[str, np.ndarray] | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Write a synthetic HF-layout Gemma-3 checkpoint directory and return its path."""
    cfg = cfg or tiny_config()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    w = weights if weights is not None else random_weights(cfg, seed)
    write_safetensors(out / "model.safetensors", w, dtype=dtype)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(style=config_style), indent=2))
    if with_tokenizer:
        (out / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json(cfg.vocab_size)))
        (out / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True})
        )
    return out
