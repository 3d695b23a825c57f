"""Sampling, tokenizer, streaming decode and the generation loop (tiny synthetic model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellm.errors import ModelRuntimeError, SamplingError
from cellm.runtime.generate import generate_ids, generate_text
from cellm.runtime.model import GemmaModel
from cellm.runtime.sampling import Sampler, SamplingParams
from cellm.runtime.tokenizer import IncrementalDecoder, Tokenizer, find_tokenizer
from cellm.runtime.weights import DenseWeights
from cellm.synthetic import random_weights, tiny_config, tiny_tokenizer_json


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(max_position_embeddings=64)
    w = random_weights(cfg, seed=7)
    return cfg, w, GemmaModel(DenseWeights(cfg, w))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(json.dumps(tiny_tokenizer_json(512)), from_str=True)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"max_new_tokens": -3}, "max_new_tokens=-3"),
        ({"temperature": float("nan")}, "temperature=nan"),
    ],
)
def test_invalid_sampling_params(kw, needle):
    with pytest.raises(SamplingError, match=needle.replace("(", r"\(")):
        SamplingParams(**kw)


def test_greedy_matches_transformers_generate(tiny):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg, w, model = tiny
    hf = Gemma3ForCausalLM(Gemma3TextConfig(**cfg.to_hf_dict(5))).eval()
    hf.config._attn_implementation = "eager"
    sd = {k: torch.from_numpy(v) for k, v in w.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=False)
    prompt = [2, 400, 401, 402, 17, 250]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=20)[0, len(prompt):].tolist()
    got = generate_ids(model, prompt, SamplingParams(max_new_tokens=20), stop_ids=[]).new_ids
    assert list(got) == ref


def test_sampling_seeded_and_filters(tiny):
    cfg, _, model = tiny
    prompt = [2, 300, 301]
    p = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=5, seed=11)
    a = generate_ids(model, prompt, p, stop_ids=[]).new_ids
    b = generate_ids(model, prompt, p, stop_ids=[]).new_ids
    assert a == b
    greedy = generate_ids(model, prompt, SamplingParams(max_new_tokens=12), stop_ids=[]).new_ids
    assert generate_ids(model, prompt, SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=1), stop_ids=[]).new_ids == greedy
    assert generate_ids(model, prompt, SamplingParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=1), stop_ids=[]).new_ids == greedy


def test_sampler_distribution_top_k_top_p():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float64)).astype(np.float32)
    n = 5000
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    freq = np.bincount([s(logits) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    freq = np.bincount([s(logits) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0], atol=0.03)
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))  # 0.5+0.25 < 0.8 -> keep 3
    freq = np.bincount([s(logits) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(freq, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], atol=0.03)


def test_stops_on_eos_and_context(tiny):
    cfg, _, model = tiny
    prompt = [2, 300, 301]
    greedy = generate_ids(model, prompt, SamplingParams(max_new_tokens=10), stop_ids=[]).new_ids
    r = generate_ids(model, prompt, SamplingParams(max_new_tokens=10), stop_ids=[greedy[3]])
    assert r.stop_reason == "eos" and r.new_ids == greedy[: greedy.index(greedy[3])]
    r = generate_ids(model, [2] * 60, SamplingParams(max_new_tokens=10), stop_ids=[])
    assert r.stop_reason == "context" and len(r.new_ids) == 4
    with pytest.raises(ModelRuntimeError, match="65 tokens.*64"):
        generate_ids(model, [2] * 65, SamplingParams(max_new_tokens=1))
    short = GemmaModel(model.weights, max_context=16)
    with pytest.raises(ModelRuntimeError, match="20 tokens.*16"):
        generate_ids(short, [2] * 20, SamplingParams(max_new_tokens=1))


def test_incremental_decoding_byte_fallback(tok):
    text = "héllo wörld ✓ — ok 日本"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 2 and any(107 <= i < 107 + 256 for i in ids)  # byte-fallback pieces present
    dec = IncrementalDecoder(tok)
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_chat_template(tok):
    ids = tok.chat("hi")
    assert ids[:2] == [2, 105] and ids[-1] != 106 and 106 in ids
    assert tok.decode(ids, skip_special=False).startswith("<bos><start_of_turn>")


def test_generate_text_streams(tiny, tok):
    _, _, model = tiny
    seen = []
    text, res = generate_text(model, tok, "abc", SamplingParams(max_new_tokens=8), on_text=seen.append)
    assert "".join(seen) == text == tok.decode(res.new_ids)


def test_missing_tokenizer(tmp_path):
    f = tmp_path / "m.cellm"
    f.write_bytes(b"CELLM\x01")
    with pytest.raises(ModelRuntimeError, match="no tokenizer.*m.tokenizer.json"):
        find_tokenizer(f)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json(512)))
    assert find_tokenizer(f).name == "tokenizer.json"
    (tmp_path / "m.tokenizer.json").write_text(json.dumps(tiny_tokenizer_json(512)))
    assert find_tokenizer(f).name == "m.tokenizer.json"
