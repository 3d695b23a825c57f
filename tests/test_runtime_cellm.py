"""The runtime on converted .cellm files (every profile / dtype), the CLI, and bad input."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch

from cellm.cli import main
from cellm.errors import ModelRuntimeError
from cellm.runtime import load_model
from cellm.synthetic import make_checkpoint, tiny_config

PROFILES = ["f16", "int8-v1", "int4-v1", "mixed-int4-v1", "mixed-int4"]


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    from cellm.convert import convert

    d = tmp_path_factory.mktemp("tiny-cellm")
    # 4 layers with a rope-scaled global layer and a short window; t4-style config
    cfg = tiny_config(num_hidden_layers=4, layer_types=("sliding_attention", "full_attention",
                                                       "sliding_attention", "full_attention"))
    ck = make_checkpoint(d / "src", cfg, seed=1, config_style=4)
    return ck, {p: convert(str(ck), p, out=d / f"t-{p}.cellm").path for p in PROFILES}


def _hf_logits_from_reader(path, ids):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from cellm.format.reader import CellmReader

    with CellmReader(path) as r:
        hf = Gemma3ForCausalLM(Gemma3TextConfig(**r.config.to_hf_dict(5))).eval()
        hf.config._attn_implementation = "eager"
        sd = {n: torch.from_numpy(np.ascontiguousarray(r.dequantize(n)))
              for n, t in r.tensors.items() if not n.endswith((".qscale", ".qzero"))}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    with torch.no_grad():
        return hf(torch.from_numpy(ids[None]), use_cache=False).logits[0].numpy()


@pytest.mark.parametrize("profile", PROFILES)
def test_cellm_logits_match_transformers_on_dequantized_weights(tiny_artifacts, profile):
    _, arts = tiny_artifacts
    ids = np.random.default_rng(0).integers(0, 512, size=30)
    ref = _hf_logits_from_reader(arts[profile], ids)
    for cache in ("f32", "layers", "none"):
        m = load_model(arts[profile], cache=cache)
        got = m.forward(ids, m.new_state())
        assert np.max(np.abs(got - ref)) < 1e-4, cache


def test_source_reference_and_quantized_differ(tiny_artifacts):
    ck, arts = tiny_artifacts
    ids = np.arange(5, 40)
    src = load_model(str(ck))
    a = src.forward(ids, src.new_state())
    f16 = load_model(arts["f16"])
    b = f16.forward(ids, f16.new_state())
    i4 = load_model(arts["int4-v1"])
    c = i4.forward(ids, i4.new_state())
    assert np.max(np.abs(a - b)) < 5e-3 < np.max(np.abs(a - c))


def test_cli_generate_streams_and_reports_speed(tiny_artifacts, capsys):
    _, arts = tiny_artifacts
    rc = main(["generate", str(arts["int8-v1"]), "--prompt", "abc", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("abc")
    assert re.search(r"prefill [\d.]+ tok/s.*decode [\d.]+ tok/s", err)
    rc = main(["generate", str(arts["f16"]), "--prompt", "abc", "--temperature", "-1"])
    assert rc == 2 and "temperature=-1.0" in capsys.readouterr().err
    rc = main(["generate", str(arts["f16"]), "--prompt", "x" * 40, "--max-context", "20"])
    err = capsys.readouterr().err
    assert rc == 2 and "41 tokens" in err and "20" in err


def test_missing_tokenizer_cli(tiny_artifacts, tmp_path, capsys):
    _, arts = tiny_artifacts
    lone = tmp_path / "lone.cellm"
    lone.write_bytes(arts["f16"].read_bytes())
    rc = main(["generate", str(lone), "--prompt", "a"])
    assert rc == 2 and "no tokenizer" in capsys.readouterr().err


def _rewrite_header(src, dst, **changes):
    data = src.read_bytes()
    (hlen,) = struct.unpack("<I", data[6:10])
    header = json.loads(data[10 : 10 + hlen])
    header.update(changes)
    header.get("source_text_config", {}).update({"model_type": changes.get("model_type", "gemma3_text")})
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (hlen - len(new))  # keep the length so offsets stay valid
    assert len(new) == hlen
    dst.write_bytes(data[:6] + struct.pack("<I", hlen) + new + data[10 + hlen :])


def test_other_architecture_rejected(tiny_artifacts, tmp_path):
    _, arts = tiny_artifacts
    bad = tmp_path / "llama.cellm"
    _rewrite_header(arts["f16"], bad, model_type="llama")
    with pytest.raises(ModelRuntimeError, match="model_type='llama' is not supported"):
        load_model(bad)
    junk = tmp_path / "junk.cellm"
    junk.write_bytes(b"NOTCELLM" + b"\0" * 20)
    with pytest.raises(ModelRuntimeError, match="not a .cellm file"):
        load_model(junk)


def test_cli_generate_onnxruntime_engine_matches_numpy(tiny_artifacts, tmp_path, capsys):
    from cellm.onnx_export.export import export_onnx

    _, arts = tiny_artifacts
    out = export_onnx(arts["f16"], tmp_path / "onnx", accuracy_level=1)
    args = ["--prompt", "hello", "--max-new-tokens", "8"]
    assert main(["generate", str(arts["f16"]), *args]) == 0
    numpy_text = capsys.readouterr().out
    assert main(["generate", str(out), "--engine", "onnxruntime", *args]) == 0
    cap = capsys.readouterr()
    assert cap.out == numpy_text and "decode" in cap.err
