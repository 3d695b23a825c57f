"""evaluate() end to end on a tiny synthetic model: numbers vs an independent transformers computation,
reference caching, reports, and `cellm eval --gate` exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellm.cli import main
from cellm.eval import evaluate

CORPUS = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
          "def add(a, b):\n    return a + b\n- eggs\n- milk\n\"Hello,\" she said.\n") * 2
PROMPTS = "# tiny prompts\nOnce upon a time\nThe answer is\\n\ndef f(x):\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cellm.convert import convert
    from cellm.synthetic import make_checkpoint, tiny_config

    d = tmp_path_factory.mktemp("evtiny")
    ck = make_checkpoint(d / "src", tiny_config(), seed=2)
    arts = {p: convert(str(ck), p, out=d / f"e-{p}.cellm").path for p in ("f16", "int8-v1", "int4-v1")}
    (d / "corpus.txt").write_text(CORPUS)
    (d / "prompts.txt").write_text(PROMPTS)
    return d, ck, arts


def _kw(d):
    return dict(corpus=d / "corpus.txt", prompts=d / "prompts.txt", window=40, top_k=512, gen_tokens=6,
                max_tokens=0, cache=d / "cache")


def _hf_logprobs(weights: dict, cfg, windows):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf = Gemma3ForCausalLM(Gemma3TextConfig(**cfg.to_hf_dict(5))).eval()
    hf.config._attn_implementation = "eager"
    sd = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in weights.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=False)
    out = []
    with torch.no_grad():
        for w in windows:
            out.append(torch.log_softmax(hf(torch.from_numpy(w[None, :-1])).logits[0].double(), -1).numpy())
    return np.concatenate(out)


def test_metrics_match_independent_transformers_computation(setup):
    from cellm.eval.data import corpus_windows
    from cellm.format.reader import CellmReader
    from cellm.runtime.tokenizer import Tokenizer
    from cellm.sources import open_source

    d, ck, arts = setup
    rep = evaluate(arts["int4-v1"], str(ck), **_kw(d))
    src = open_source(str(ck))
    tok = Tokenizer.for_artifact(str(ck))
    ids = tok.encode(CORPUS, add_bos=False)
    windows = corpus_windows(ids, 2, 40)
    ref = _hf_logprobs({n: src.load(n) for n in src.tensor_names()}, src.config, windows)
    with CellmReader(arts["int4-v1"]) as r:
        cand = _hf_logprobs({n: r.dequantize(n) for n in r.tensors if not n.endswith(".qscale")}, r.config, windows)
    targets = np.concatenate([w[1:] for w in windows])
    kl = (np.exp(ref) * (ref - cand)).sum(-1)
    m = rep.metrics
    assert m["tokens"] == len(ids) == len(targets)
    assert m["mean_kl"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-6)
    assert m["p99_kl"] == pytest.approx(np.percentile(kl, 99), rel=1e-3, abs=1e-6)
    assert m["top1_agreement"] == pytest.approx((ref.argmax(-1) == cand.argmax(-1)).mean())
    nll_c = -cand[np.arange(len(targets)), targets].mean()
    nll_r = -ref[np.arange(len(targets)), targets].mean()
    assert m["ppl_candidate"] == pytest.approx(np.exp(nll_c), rel=1e-4)
    assert m["ppl_reference"] == pytest.approx(np.exp(nll_r), rel=1e-4)
    assert m["prompts"] == 3 and len(rep.generations) == 3
    assert rep.gate_class == "int4"


def test_reference_cached_and_keyed_by_corpus(setup, tmp_path):
    d, ck, arts = setup
    kw = _kw(d)
    kw["cache"] = tmp_path / "c"
    a = evaluate(arts["f16"], str(ck), **kw)
    assert not a.settings["reference_cached"]
    b = evaluate(arts["int8-v1"], str(ck), **kw)
    assert b.settings["reference_cached"]
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    (tmp_path / "other.txt").write_text(CORPUS[:150])
    c = evaluate(arts["f16"], str(ck), **dict(kw, corpus=tmp_path / "other.txt"))
    assert not c.settings["reference_cached"] and c.metrics["tokens"] < a.metrics["tokens"]
    # f16 of random tiny weights is near-lossless; int8 close; greedy generations agree for f16
    assert a.metrics["mean_kl"] < 1e-3 and a.metrics["top1_agreement"] > 0.97
    assert a.metrics["gen_agreement_mean"] > 0.8


def test_cli_eval_gate_exit_codes_and_reports(setup, tmp_path, capsys):
    d, ck, arts = setup
    base = ["--reference", str(ck), "--corpus", str(d / "corpus.txt"), "--prompts", str(d / "prompts.txt"),
            "--window", "40", "--gen-tokens", "6", "--max-tokens", "0", "--quiet"]
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["eval", str(arts["f16"]), *base, "--gate", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(js.read_text())
    assert report["gate"]["passed"] and report["gate"]["gate_class"] == "f16"
    assert "## Gate `f16`: PASS" in md.read_text()
    # per-row int4 judged by the int8 class: exit 1, naming the metric and the miss
    rc = main(["eval", str(arts["int4-v1"]), *base, "--gate", "--gate-class", "int8"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "gate int8 FAILED" in captured.err and "top1_agreement" in captured.err and "missed by" in captured.err
