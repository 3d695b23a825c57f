"""GGUF sources on small synthetic GGUFs written with ``gguf.GGUFWriter``.

References are independent of our code: ``gguf.GGUFReader`` + ``gguf.quants.dequantize`` for the
weights, and transformers' own GGUF tokenizer conversion for the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from cellm.errors import SourceError
from cellm.names import expected_tensors
from cellm.sources import open_source
from cellm.sources.gguf_source import convert_gguf, read_gguf

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV, HEAD_DIM, FFN, LAYERS = 256, 2, 1, 128, 512, 2

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
PIECES = (
    ["▁", "▁▁", "▁▁▁"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + list("0123456789.,!?'():;=_-+*/\"{}[]<>#")
    + ["th", "he", "▁t", "▁th", "▁the", "in", "▁in", "an", "nd", "▁a", "▁and", "er", "▁c", "at", "▁cat",
       "ca", "▁ca", "re", "▁re", "on", "▁on", "ing", "▁s", "▁sat", "sa", "ma", "▁ma", "▁mat", "de", "def",
       "▁f", "▁fo", "▁foo", "oo", "fo", "ret", "▁ret", "urn", "▁return", "retur", "▁retur", "é", "ét", "été",
       "▁été", "日本", "本", "日", "語", "▁▁▁▁", "ll", "▁he", "▁hel", "▁hell", "▁hello", "el", "lo", "llo",
       "wor", "▁w", "▁wo", "▁wor", "▁world", "ld", "rld", "orld"]
)


def tokenizer_vocab() -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for t in SPECIALS:
        tokens.append(t), types.append(3)
    tokens.append("[multimodal]"), types.append(4)
    for i in range(4):
        tokens.append(f"<unused{i}>"), types.append(3)
    tokens += ["<start_of_turn>", "<end_of_turn>"]
    types += [3, 3]
    for t in ["\n", "\n\n", "  ", "   ", "\t"]:  # user-defined, some of them space runs
        tokens.append(t), types.append(4)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>"), types.append(6)
    for p in PIECES:
        tokens.append(p), types.append(1)
    return tokens, types


def _kquant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid Q4_K / Q6_K bytes (finite f16 super-block scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
    else:  # Q6_K: d is the last two bytes
        raw[..., size - 2 : size] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, arch: str = "gemma3", seed: int = 0, drop: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    tokens, types = tokenizer_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(1024)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(64)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)

    def dense(rows, cols, qtype):
        a = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32)
        return gguf.quants.quantize(a, qtype) if qtype not in (Q.F32, Q.F16) else (a if qtype == Q.F32 else a.astype(np.float16))

    def add(name, data, qtype=None):
        if name == drop:
            return
        if qtype in (None, Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)

    add("token_embd.weight", dense(len(tokens), HIDDEN, Q.Q8_0), Q.Q8_0)
    add("output_norm.weight", (1 + rng.normal(0, 0.1, HIDDEN)).astype(np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_q.weight", dense(HEADS * HEAD_DIM, HIDDEN, Q.Q5_0), Q.Q5_0)
        add(p + "attn_k.weight", dense(KV * HEAD_DIM, HIDDEN, Q.Q4_0), Q.Q4_0)
        add(p + "attn_v.weight", dense(KV * HEAD_DIM, HIDDEN, Q.Q8_0), Q.Q8_0)
        add(p + "attn_output.weight", _kquant_blocks(rng, HIDDEN, HEADS * HEAD_DIM, Q.Q4_K), Q.Q4_K)
        add(p + "ffn_gate.weight", dense(FFN, HIDDEN, Q.Q5_1), Q.Q5_1)
        add(p + "ffn_up.weight", dense(FFN, HIDDEN, Q.F16 if i else Q.Q4_1), Q.F16 if i else Q.Q4_1)
        add(p + "ffn_down.weight", _kquant_blocks(rng, HIDDEN, FFN, Q.Q6_K), Q.Q6_K)
        for n, size in (("attn_norm", HIDDEN), ("post_attention_norm", HIDDEN), ("ffn_norm", HIDDEN),
                        ("post_ffw_norm", HIDDEN), ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM)):
            add(p + n + ".weight", (1 + rng.normal(0, 0.1, size)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
for _i in range(LAYERS):
    for _g, _h in {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
        "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }.items():
        NAME_MAP[f"blk.{_i}.{_g}.weight"] = f"model.layers.{_i}.{_h}.weight"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cellm-cache"))


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny-gemma3.gguf")


def test_gguf_source_dequantizes_maps_and_unshifts_norms(tiny_gguf):
    ck = open_source(str(tiny_gguf))
    reader = gguf.GGUFReader(str(tiny_gguf))
    assert ck.tensor_names() == sorted(NAME_MAP.values()) == sorted(expected_tensors(ck.config))
    seen_types = set()
    for t in reader.tensors:
        ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        hf = NAME_MAP[t.name]
        got = ck.load(hf)
        seen_types.add(t.tensor_type.name)
        if "norm" in t.name:
            np.testing.assert_array_equal(got, ref.reshape(got.shape) - np.float32(1))
        else:
            assert got.shape == tuple(int(d) for d in reversed(t.shape))
            np.testing.assert_array_equal(got, ref.reshape(got.shape))
        assert ck.dtype(hf) == "F32"
    assert seen_types == {"F32", "F16", "Q8_0", "Q5_0", "Q4_0", "Q5_1", "Q4_1", "Q4_K", "Q6_K"}
    rows = ck.load("model.embed_tokens.weight", rows=slice(300, 310))
    np.testing.assert_array_equal(rows, ck.load("model.embed_tokens.weight")[300:310])


def test_gguf_config(tiny_gguf):
    cfg = open_source(str(tiny_gguf)).config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        HIDDEN, LAYERS, HEADS, KV)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.sliding_window) == (HEAD_DIM, FFN, 64)
    assert cfg.vocab_size == len(tokenizer_vocab()[0])
    assert cfg.rope_global.theta == 1_000_000.0 and cfg.rope_local.theta == 10_000.0
    assert cfg.rms_norm_eps == 1e-6 and cfg.query_pre_attn_scalar == HEAD_DIM
    assert cfg.max_position_embeddings == 1024 and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (1, tokenizer_vocab()[0].index("<end_of_turn>"))


def test_gguf_conversion_is_cached_and_deterministic(tiny_gguf, tmp_path):
    a = open_source(str(tiny_gguf))
    b = open_source(str(tiny_gguf))
    assert a.path == b.path and a.content_hash == b.content_hash
    assert a.provenance["gguf_sha256"] == a.path.name
    convert_gguf(tiny_gguf, tmp_path / "again")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (a.path / f).read_bytes(), f


def test_read_gguf_metadata_matches_gguf_reader(tiny_gguf):
    mine = read_gguf(tiny_gguf)
    reader = gguf.GGUFReader(str(tiny_gguf))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert mine.metadata[key] == field.contents(), key
    for t in reader.tensors:
        m = mine.tensors[t.name]
        assert m.offset == t.data_offset and m.nbytes == t.n_bytes and m.qtype == int(t.tensor_type)


def test_gguf_tokenizer_matches_transformers(tiny_gguf, tmp_path):
    from tokenizers import Tokenizer
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tdict, _ = get_gguf_tokenizer(str(tiny_gguf))
    ref, _ = convert_gguf_tokenizer(arch, tdict)
    ck = open_source(str(tiny_gguf))
    mine = Tokenizer.from_file(str(ck.tokenizer_json))
    texts = [
        "the cat sat on the mat", "hello world", "  leading spaces and trailing   ", "tabs\tand\nnewlines\n\n",
        "def foo(): return 42", "été 日本語 ünïcödé", "x" * 50, "<start_of_turn>user\nhi<end_of_turn>\n",
        "   ", "", "a  b   c    d", "\U0001F600 emoji",
    ]
    for text in texts:
        r = ref.encode(text, add_special_tokens=False).ids
        assert mine.encode(text, add_special_tokens=False).ids == r, text
        assert mine.encode(text).ids == [2] + r, text
        assert mine.decode(r, skip_special_tokens=False) == ref.decode(r, skip_special_tokens=False)
    tj = json.loads(ck.tokenizer_json.read_text())
    rj = json.loads(ref.to_str())
    assert tj["model"] == rj["model"]
    assert tj["added_tokens"] == rj["added_tokens"]
    tc = json.loads((ck.path / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"] == "<bos>"


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(SourceError, match="GGUF architecture 'llama' unsupported; supported: gemma3"):
        open_source(str(path))


def test_gguf_missing_tensor(tmp_path):
    path = write_gguf(tmp_path / "partial.gguf", drop="blk.1.ffn_down.weight")
    with pytest.raises(SourceError, match=r"lacks 1 Gemma-3 tensors.*model.layers.1.mlp.down_proj.weight"):
        open_source(str(path))


def test_corrupt_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(SourceError, match="bad GGUF magic"):
        open_source(str(bad_magic))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="exceeds the file"):
        open_source(str(truncated))
    header_cut = tmp_path / "cut.gguf"
    header_cut.write_bytes(data[:3000])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        open_source(str(header_cut))
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(data[:8] + (1 << 60).to_bytes(8, "little") + data[16:])
    with pytest.raises(SourceError, match="exceed the file size"):
        open_source(str(huge))


def test_gguf_weights_and_config_match_transformers_gguf_loader(tiny_gguf):
    """transformers' own GGUF loader (name map, dequantization, Gemma norm -1) as the reference."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    raw = load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)["config"]
    model = Gemma3ForCausalLM(Gemma3TextConfig(**raw))
    ref = load_gguf_checkpoint(str(tiny_gguf), return_tensors=True, model_to_load=model)["tensors"]
    ck = open_source(str(tiny_gguf))
    assert sorted(ref) == ck.tensor_names()
    for name in ck.tensor_names():
        np.testing.assert_array_equal(ck.load(name), ref[name].float().numpy(), err_msg=name)
    cfg, tcfg = ck.config, model.config
    for ours, theirs in [
        (cfg.hidden_size, tcfg.hidden_size), (cfg.num_hidden_layers, tcfg.num_hidden_layers),
        (cfg.num_attention_heads, tcfg.num_attention_heads), (cfg.num_key_value_heads, tcfg.num_key_value_heads),
        (cfg.head_dim, tcfg.head_dim), (cfg.intermediate_size, tcfg.intermediate_size),
        (cfg.vocab_size, tcfg.vocab_size), (cfg.sliding_window, tcfg.sliding_window),
        (list(cfg.layer_types), list(tcfg.layer_types)),
        (cfg.max_position_embeddings, tcfg.max_position_embeddings),
        (cfg.rope_global.theta, tcfg.rope_parameters["full_attention"]["rope_theta"]),
        (cfg.rope_local.theta, tcfg.rope_parameters["sliding_attention"]["rope_theta"]),
    ]:
        assert ours == theirs
    assert cfg.rms_norm_eps == pytest.approx(tcfg.rms_norm_eps, rel=1e-7)
