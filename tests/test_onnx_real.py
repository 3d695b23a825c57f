"""The real Gemma-3 270M: ONNX export run by onnxruntime vs the numpy runtime on the same artifact.

One conversion (``int4-g32``: every projection AND the tied embedding group-wise int4, so the
quantized GatherBlockQuantized / MatMulNBits LM head path is exercised) and two exports (accuracy
levels 1 and 4) are shared by the whole session.

Greedy continuations are checked on every 4th eval prompt (7 of the 25 in cellm/data/prompts.txt)
to keep the suite's time budget: ORT generates 64 greedy tokens, then ONE numpy forward over
prompt + continuation must pick every one of those tokens as its argmax — by induction exactly the
numpy runtime's own greedy continuation.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.real

N_LONG = 640  # > sliding_window (512): the sliding layers must drop the oldest keys
GEN_TOKENS = 64
PROMPT_STRIDE = 4


@pytest.fixture(scope="session")
def real_onnx(real_ckpt, tmp_path_factory) -> SimpleNamespace:
    from cellm.convert import convert
    from cellm.onnx_export import export_onnx

    tmp = tmp_path_factory.mktemp("onnx-real")
    art = convert(str(real_ckpt), "int4-g32", out=tmp / "g270-int4-g32.cellm").path
    return SimpleNamespace(
        art=art,
        l1=export_onnx(art, tmp / "onnx-l1", accuracy_level=1),
        l4=export_onnx(art, tmp / "onnx-l4", accuracy_level=4),
    )


@pytest.fixture(scope="session")
def tok(real_onnx):
    from cellm.runtime.tokenizer import Tokenizer

    return Tokenizer.for_artifact(real_onnx.art)


@pytest.fixture(scope="session")
def long_case(real_onnx, tok) -> SimpleNamespace:
    from cellm.eval import data
    from cellm.runtime import load_model

    text, _ = data.read_text(None, data.DEFAULT_CORPUS)
    ids = np.array(tok.encode(text, add_bos=True)[:N_LONG], dtype=np.int64)
    assert len(ids) == N_LONG
    ref = load_model(real_onnx.art)
    return SimpleNamespace(ids=ids, ref=ref, logits=ref.forward(ids, ref.new_state()))


def test_long_input_logits_match_numpy_runtime_level1(real_onnx, long_case):
    from cellm.onnx_export import load_ort_model

    m = load_ort_model(real_onnx.l1)
    st = m.new_state()
    got = np.concatenate([m.forward(long_case.ids[:600], st), m.forward(long_case.ids[600:], st)])
    diff = np.abs(got - long_case.logits).max(axis=-1)
    assert diff.max() < 0.05, f"max |dlogit| {diff.max():.4f} at position {int(diff.argmax())}"
    assert diff[512:].max() < 0.05  # beyond the sliding window
    assert (got.argmax(-1) == long_case.logits.argmax(-1)).mean() >= 0.995


def test_top1_agreement_level4(real_onnx, long_case):
    """accuracy_level 4 quantizes activations to int8 per block inside MatMulNBits.

    Measured on this 640-token window: ~96-97% top-1 agreement with the float32 numpy runtime (the
    issue's 99% target is NOT reached at level 4 on Gemma-3 270M; level 1 gives 100%). The bound
    below guards against regressions (a wrong graph gives < 50%).
    """
    from cellm.onnx_export import load_ort_model

    m = load_ort_model(real_onnx.l4)
    got = m.forward(long_case.ids, m.new_state())
    agree = float((got.argmax(-1) == long_case.logits.argmax(-1)).mean())
    assert agree >= 0.94, agree


def _ort_greedy(m, prompt: list[int], n: int, stop) -> list[int]:
    st = m.new_state()
    lg = m.forward(np.array(prompt), st, last_only=True)
    out: list[int] = []
    while len(out) < n:
        t = int(lg[-1].argmax())
        out.append(t)
        if t in stop:
            break
        lg = m.forward(np.array([t]), st, last_only=True)
    return out


def _prompts(tok) -> list[list[int]]:
    from cellm.eval import data

    text, _ = data.read_text(None, data.DEFAULT_PROMPTS)
    prompts = data.parse_prompts(text)
    assert len(prompts) >= 20
    return [tok.encode(p, add_bos=True) for p in prompts[::PROMPT_STRIDE]]


def test_greedy_continuations_identical_to_numpy_runtime_level1(real_onnx, long_case, tok):
    from cellm.onnx_export import load_ort_model

    m = load_ort_model(real_onnx.l1)
    stop = m.config.eos_token_ids
    ref = long_case.ref
    for prompt in _prompts(tok):  # all shorter than the sliding window
        cont = _ort_greedy(m, prompt, GEN_TOKENS, stop)
        assert cont and (len(cont) == GEN_TOKENS or cont[-1] in stop)
        seq = np.array(prompt + cont[:-1], dtype=np.int64)
        ref_next = ref.forward(seq, ref.new_state()).argmax(-1)[len(prompt) - 1:]
        assert ref_next.tolist() == cont, tok.decode(prompt)


def test_onnxruntime_genai_runs_the_export_unchanged(real_onnx, tok):
    og = pytest.importorskip("onnxruntime_genai")
    from cellm.onnx_export import load_ort_model

    d = real_onnx.l4
    model = og.Model(str(d))
    gtok = og.Tokenizer(model)
    gtok.update_options(add_special_tokens="true")
    m = load_ort_model(d)
    for text in ("The capital of France is", "def fibonacci(n):"):
        ids = [int(x) for x in gtok.encode(text)]
        assert ids == tok.encode(text, add_bos=True) and ids[0] == 2
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 24)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        got: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        assert got == _ort_greedy(m, ids, len(got), m.config.eos_token_ids)
