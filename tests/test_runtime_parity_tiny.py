"""numpy runtime vs transformers Gemma3ForCausalLM (float32, eager) on tiny synthetic configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellm.config import FULL, SLIDING, GemmaTextConfig, RopeSpec
from cellm.runtime.model import GemmaModel
from cellm.runtime.weights import DenseWeights
from cellm.synthetic import random_weights, tiny_config


def hf_logits(cfg: GemmaTextConfig, weights: dict, ids: np.ndarray, style: int) -> np.ndarray:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_cfg = Gemma3TextConfig(**cfg.to_hf_dict(style=style))
    hf_cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(hf_cfg).eval()
    sd = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    assert not unexpected, unexpected
    with torch.no_grad():
        out = model(torch.from_numpy(ids[None].astype(np.int64)), use_cache=False)
    return out.logits[0].float().numpy()


CASES = {
    # query_pre_attn_scalar (24) != head_dim (32), GQA 4/2, window 8 < 20 tokens, t5 style
    "tiny-t5": (tiny_config(), 5),
    "tiny-t4": (tiny_config(), 4),
    # custom layer_types, MQA, linear rope scaling on the global layers, t4 style (rope_scaling)
    "custom-layers-linear-rope-t4": (
        tiny_config(
            num_hidden_layers=4, num_key_value_heads=1,
            layer_types=(FULL, SLIDING, SLIDING, FULL),
            rope_global=RopeSpec(1_000_000.0, factor=8.0), sliding_window=5,
        ),
        4,
    ),
    "custom-layers-linear-rope-t5": (
        tiny_config(
            num_hidden_layers=4, layer_types=(SLIDING, FULL, SLIDING, SLIDING),
            rope_global=RopeSpec(500_000.0, factor=4.0), rope_local=RopeSpec(20_000.0),
            query_pre_attn_scalar=16.0, sliding_window=6,
        ),
        5,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_sequence_logits_match_transformers(case):
    cfg, style = CASES[case]
    w = random_weights(cfg, seed=3)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=21)
    ref = hf_logits(cfg, w, ids, style)
    model = GemmaModel(DenseWeights(cfg, w))
    got = model.forward(ids, model.new_state())
    assert got.shape == ref.shape == (21, cfg.vocab_size)
    assert np.max(np.abs(got - ref)) < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decode_matches_full_sequence(case):
    cfg, _ = CASES[case]
    w = random_weights(cfg, seed=4)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=23)
    model = GemmaModel(DenseWeights(cfg, w))
    full = model.forward(ids, model.new_state())
    # prefill 7, then one token at a time
    st = model.new_state()
    parts = [model.forward(ids[:7], st)] + [model.forward(ids[i : i + 1], st) for i in range(7, 23)]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=2e-5, rtol=0)
    # uneven chunks crossing the window
    st = model.new_state()
    parts = [model.forward(ids[a:b], st) for a, b in [(0, 5), (5, 14), (14, 15), (15, 23)]]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=2e-5, rtol=0)
    assert st.pos == 23
    # sliding layers keep at most window - 1 cached entries
    for i, lc in enumerate(st.layers):
        if cfg.is_sliding(i):
            assert lc.n == cfg.sliding_window - 1


def test_last_only_and_hook():
    cfg = tiny_config()
    w = random_weights(cfg, seed=5)
    model = GemmaModel(DenseWeights(cfg, w))
    ids = np.arange(10, 22)
    seen: dict[str, tuple] = {}
    full = model.forward(ids, model.new_state(), on_linear_input=lambda n, x: seen.setdefault(n, x.shape))
    last = model.forward(ids, model.new_state(), last_only=True)
    np.testing.assert_allclose(last[0], full[-1], atol=1e-6)
    # every 2-D matmul weight reports its input activations [T, in]
    for name, shape in seen.items():
        assert shape == (12, w[name].shape[1]), name
    assert sum(1 for n in w if w[n].ndim == 2) == len(seen)


def test_hidden_batch_matches_per_sequence_decode():
    cfg = tiny_config()
    w = random_weights(cfg, seed=6)
    model = GemmaModel(DenseWeights(cfg, w))
    prompts = [np.arange(3, 3 + n) for n in (4, 11, 1)]  # 11 > window 8
    solo, states = [], []
    for pr in prompts:
        st = model.new_state()
        model.hidden(pr, st)
        states.append(st)
        ref_st = model.new_state()
        model.hidden(pr, ref_st)
        solo.append(model.hidden(np.asarray([7]), ref_st)[0])
        solo[-1] = (solo[-1], model.hidden(np.asarray([9]), ref_st)[0])
    h1 = model.hidden_batch(np.asarray([7, 7, 7]), states)
    h2 = model.hidden_batch(np.asarray([9, 9, 9]), states)
    for b in range(3):
        np.testing.assert_allclose(h1[b], solo[b][0], atol=1e-5)
        np.testing.assert_allclose(h2[b], solo[b][1], atol=1e-5)
    assert [s.pos for s in states] == [6, 13, 3]
