"""onnxruntime-genai runs our export unchanged (Model / Generator / Tokenizer) and agrees with our engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellm.convert import convert
from cellm.onnx_export import export_onnx, load_ort_model
from cellm.synthetic import make_checkpoint, tiny_config

og = pytest.importorskip("onnxruntime_genai")  # a declared dependency; importorskip only names it


def genai_greedy(d: Path, prompt: list[int], n: int, max_length: int = 256) -> list[int]:
    model = og.Model(str(d))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out: list[int] = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def engine_greedy(m, prompt: list[int], n: int, stop=(1, 106)) -> list[int]:
    st = m.new_state()
    lg = m.forward(np.array(prompt), st)
    out: list[int] = []
    while len(out) < n:
        t = int(lg[-1].argmax())
        out.append(t)
        if t in stop:
            break
        lg = m.forward(np.array([t]), st)
    return out


@pytest.fixture(scope="module", params=[(1, False), (4, True)], ids=["level1", "level4-int8-residual"])
def tiny_export(tmp_path_factory, request) -> Path:
    """Level 1, and level 4 with int8_residual (batch axis doubled around every MatMulNBits)."""
    level, residual = request.param
    tmp = tmp_path_factory.mktemp("genai")
    ck = make_checkpoint(tmp / "ck", tiny_config(), seed=11)
    art = convert(str(ck), "int4-g32", out=tmp / "m.cellm").path
    return export_onnx(art, tmp / "onnx", accuracy_level=level, int8_residual=residual)


def test_genai_generator_matches_our_engine(tiny_export):
    m = load_ort_model(tiny_export)
    for seed in range(3):  # prompts longer than the window (8) and shorter
        prompt = [2] + list(np.random.default_rng(seed).integers(5, 500, size=3 + 7 * seed))
        ours = engine_greedy(m, prompt, 24)
        assert genai_greedy(tiny_export, prompt, len(ours)) == ours


def test_genai_logits_equal_our_engine(tiny_export):
    model = og.Model(str(tiny_export))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    gen = og.Generator(model, params)
    ids = [2] + list(range(300, 320))
    gen.append_tokens(ids)
    got = np.asarray(gen.get_output("logits"))[0]
    m = load_ort_model(tiny_export)
    np.testing.assert_allclose(got, m.forward(np.array(ids), m.new_state()), atol=1e-5, rtol=0)


def test_genai_tokenizer_bos(tiny_export):
    """genai's encode adds no special tokens by default; both documented ways give <bos> first."""
    from cellm.runtime.tokenizer import Tokenizer

    ours = Tokenizer.for_artifact(tiny_export).encode("hello world", add_bos=True)
    assert ours[0] == 2
    tok = og.Tokenizer(og.Model(str(tiny_export)))
    assert [int(x) for x in tok.encode("<bos>hello world")] == ours
    tok.update_options(add_special_tokens="true")
    assert [int(x) for x in tok.encode("hello world")] == ours
