"""The real Gemma-3 270M: logits parity with transformers (f16 and quantized artifacts) on an input
longer than the 512-token sliding window, and the gate outcomes per profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real

PARITY_TOKENS = 640  # > sliding_window (512): exercises the window mask on 15 of 18 layers


@pytest.fixture(scope="session")
def real_artifacts(real_ckpt, tmp_path_factory):
    """Converted 270M artifacts, built lazily once per session."""
    from cellm.convert import convert

    d = tmp_path_factory.mktemp("real-cellm")
    built: dict[str, object] = {}

    def get(profile: str):
        if profile not in built:
            built[profile] = convert(str(real_ckpt), profile, out=d / f"gemma-3-270m-{profile}.cellm").path
        return built[profile]

    return get


@pytest.fixture(scope="module")
def hf_model(real_ckpt):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from cellm.sources import open_source

    torch.set_num_threads(2)
    cfg = open_source(str(real_ckpt)).config
    model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg.to_hf_dict(5)))
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module")
def corpus_ids(real_ckpt):
    from cellm.eval.data import DEFAULT_CORPUS
    from cellm.runtime.tokenizer import Tokenizer

    tok = Tokenizer.for_artifact(str(real_ckpt))
    ids = tok.encode(DEFAULT_CORPUS.read_text(), add_bos=True)
    assert len(ids) > 4000  # acceptance: >= 4,000 tokens of eval text
    return np.asarray(ids[:PARITY_TOKENS], dtype=np.int64)


@pytest.mark.parametrize("profile", ["f16", "int8-v1", "mixed-int4"])
def test_logits_parity_with_transformers_on_dequantized_weights(profile, real_artifacts, hf_model, corpus_ids):
    from cellm.format.reader import CellmReader
    from cellm.runtime import load_model

    path = real_artifacts(profile)
    with CellmReader(path) as r:
        sd = {n: torch.from_numpy(np.ascontiguousarray(r.dequantize(n)))
              for n in r.tensors if not n.endswith((".qscale", ".qzero"))}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(corpus_ids[None]), use_cache=False).logits[0].float().numpy()
    del sd
    model = load_model(path)
    got = model.forward(corpus_ids, model.new_state())
    assert got.shape == ref.shape == (PARITY_TOKENS, 262144)
    err = np.abs(got - ref).max(axis=-1)  # per position, over the whole vocabulary
    assert err.max() <= 0.02, f"max |dlogit| {err.max():.4g} at position {int(err.argmax())}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_gate_outcomes_on_the_270m(real_ckpt, real_artifacts, tmp_path):
    """int8-v1 passes its gate; per-row int4 (int4-v1, mixed-int4-v1) fails the int4 gate; the
    allocated mixed-int4-gemma3 passes it within the issue-7 targets.
    Shortened eval (2 windows, 8 generated tokens) to keep the suite fast; docs/QUALITY.md has the
    full-length numbers."""
    from cellm.eval import evaluate
    from cellm.gates import check_gates

    kw = dict(max_tokens=2 * 511, gen_tokens=8, cache=tmp_path / "evalcache", threads=2)
    verdicts = {}
    for profile in ("int8-v1", "int4-v1", "mixed-int4-v1", "mixed-int4-gemma3"):
        rep = evaluate(real_artifacts(profile), str(real_ckpt), **kw)
        verdicts[profile] = (check_gates(rep, rep.gate_class), rep.metrics)
    # issue 7: the measured allocation (0.52x int8-v1 bytes) keeps int8-class quality
    v, m = verdicts["mixed-int4-gemma3"]
    assert v.gate_class == "int4" and v.passed, m
    assert m["mean_kl"] <= 0.03 and m["top1_agreement"] >= 0.90, m
    assert real_artifacts("mixed-int4-gemma3").stat().st_size <= 0.55 * real_artifacts("int8-v1").stat().st_size
    assert verdicts["int8-v1"][0].gate_class == "int8" and verdicts["int8-v1"][0].passed, verdicts["int8-v1"]
    for p in ("int4-v1", "mixed-int4-v1"):
        v, m = verdicts[p]
        assert v.gate_class == "int4" and not v.passed, m
        assert "mean_kl" in {c.metric for c in v.failures}
