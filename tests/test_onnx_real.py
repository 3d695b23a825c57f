"""The real Gemma-3 270M: ONNX export run by onnxruntime vs the numpy runtime on the same artifact.

One conversion (``int4-g32``: every projection AND the tied embedding group-wise int4, so the
quantized GatherBlockQuantized / MatMulNBits LM head path is exercised) and three exports (accuracy
level 1, level 4, level 4 with ``int8_residual``) are shared by the whole session.

Greedy continuations are checked on ALL the eval prompts (22 in cellm/data/prompts.txt) at level 1. ORT's
level-1 one-token decode is slow on CPU (MLAS' fp32 path, ~5x slower than level 4) and so is the
numpy runtime's own decode, so the continuation is proven rather than replayed: the level-4 export
drafts a greedy continuation with one-token decode steps; ONE numpy forward and ONE level-1 ORT
teacher-forced pass through the KV cache (prompt, then the draft as one chunk) must predict the
same next token at every position of the draft's greedy prefix; where the draft leaves the greedy
path (a level-4 near-tie), the common prediction is appended and the draft resumes from there. By
induction the result is the numpy runtime's greedy continuation AND level-1 ORT's, token by token.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.real

N_LONG = 640  # > sliding_window (512): the sliding layers must drop the oldest keys
GEN_TOKENS = 64


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
        l4r=export_onnx(art, tmp / "onnx-l4r", accuracy_level=4, int8_residual=True),
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
    """accuracy_level 4 quantizes activations to int8 per block (of ``block_size``) inside MatMulNBits.

    Measured on this 640-token window (onnxruntime 1.32, AVX2): 96.4 % top-1 agreement with the float32
    numpy runtime (23 of 640 positions differ), so the issue's 99 % is NOT reached at level 4 on Gemma-3
    270M; level 1 gives 100 %. The int8 rounding error is spread evenly: level 4 on ONE projection family
    only (everything else at level 1) gives 97.7-99.2 %, on ONE layer only 99.2-100 % — no per-node policy
    reaches 99 % without giving up most of level 4's speed (docs/ONNX.md). Every disagreement is a near-tie
    of the reference: level 4's argmax is always the reference's top-1 or top-2, and where the reference's
    top-1 leads its top-2 by >= 0.5 logits the agreement is 100 % (410 of 640 positions). The bounds below
    are these facts with a margin (a wrong graph gives < 50 % / far-off tokens).
    """
    from cellm.onnx_export import load_ort_model

    m = load_ort_model(real_onnx.l4)
    got = m.forward(long_case.ids, m.new_state()).argmax(-1)
    ref = long_case.logits
    agree = got == ref.argmax(-1)
    assert agree.mean() >= 0.95, agree.mean()
    second, first = np.partition(ref, -2, axis=-1)[:, -2:].T
    assert (ref[np.arange(len(got)), got] >= second).mean() >= 0.995  # level 4's pick is the reference's top 1 or 2
    clear = first - second >= 0.5
    assert clear.sum() >= 300 and agree[clear].mean() >= 0.99, (int(clear.sum()), agree[clear].mean())


def test_top1_agreement_level4_int8_residual(real_onnx, long_case):
    """The issue's >= 99 % at level 4: with ``int8_residual`` every MatMulNBits still runs level 4's int8
    kernels, on [exactly-rounded int8 part; remainder] rows. Measured on this window: 100 % top-1 (640 of
    640), max |dlogit| 0.007 vs the numpy runtime (plain level 4: 96.4 %, 2.46; level 1: 100 %, 2e-4)."""
    from cellm.onnx_export import load_ort_model

    m = load_ort_model(real_onnx.l4r)
    st = m.new_state()
    got = np.concatenate([m.forward(long_case.ids[:600], st), m.forward(long_case.ids[600:], st)])
    agree = (got.argmax(-1) == long_case.logits.argmax(-1)).mean()
    assert agree >= 0.99, agree
    diff = np.abs(got - long_case.logits).max()
    assert diff < 0.05, diff  # level 1's bound; plain level 4 misses it by 50x


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
    return [tok.encode(p, add_bos=True) for p in prompts]


def _greedy_level1(ref, l1, l4, prompt: list[int], n: int, stop) -> list[int]:
    """The greedy continuation shared by the numpy runtime and level-1 ORT (see the module docstring)."""
    cont: list[int] = []
    while True:
        draft = cont + _ort_greedy(l4, prompt + cont, n - len(cont), stop)
        seq = np.array(prompt + draft[:-1], dtype=np.int64)
        ref_next = ref.forward(seq, ref.new_state()).argmax(-1)[len(prompt) - 1:].tolist()
        st = l1.new_state()
        ort_logits = [l1.forward(seq[: len(prompt)], st, last_only=True)]
        if len(draft) > 1:
            ort_logits.append(l1.forward(seq[len(prompt):], st))
        ort_next = np.concatenate(ort_logits).argmax(-1).tolist()
        k = next((j for j, (a, b) in enumerate(zip(draft, ref_next)) if a != b), len(draft))
        upto = min(k + 1, len(draft))  # the greedy prefix and the first prediction after it
        assert ort_next[:upto] == ref_next[:upto], (k, ort_next[:upto], ref_next[:upto])
        if k == len(draft):
            return draft
        cont = draft[:k] + [ref_next[k]]
        if cont[-1] in stop or len(cont) >= n:
            return cont


def test_greedy_continuations_identical_to_numpy_runtime_level1(real_onnx, long_case, tok):
    from cellm.onnx_export import load_ort_model

    l1, l4 = load_ort_model(real_onnx.l1, spin=False), load_ort_model(real_onnx.l4, spin=False)
    stop = l1.config.eos_token_ids
    for prompt in _prompts(tok):  # all shorter than the sliding window
        cont = _greedy_level1(long_case.ref, l1, l4, prompt, GEN_TOKENS, stop)
        assert cont and (len(cont) == GEN_TOKENS or cont[-1] in stop), tok.decode(prompt)


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
