"""ONNX export on tiny synthetic Gemma-3 checkpoints: parity with transformers (float32, eager, on the
artifact's dequantized weights) and with the numpy runtime, graph checks, determinism, bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cellm.config import FULL, SLIDING, RopeSpec
from cellm.convert import convert
from cellm.errors import ExportError
from cellm.format.reader import CellmReader
from cellm.onnx_export import export_onnx, load_ort_model
from cellm.runtime import load_model
from cellm.synthetic import make_checkpoint, tiny_config

PROFILES = ["f16", "int8-v1", "int4-v1", "mixed-int4", "int4-g32"]
LINEAR_ROPE_CFG = tiny_config(num_hidden_layers=4, num_key_value_heads=1, layer_types=(FULL, SLIDING, SLIDING, FULL),
                              rope_global=RopeSpec(1_000_000.0, factor=8.0), rope_local=RopeSpec(20_000.0),
                              sliding_window=5, query_pre_attn_scalar=16.0)


def _build(tmp: Path, cfg, profile: str, level: int = 1, seed: int = 0) -> tuple[Path, Path]:
    ck = make_checkpoint(tmp / f"ck-{seed}", cfg, seed=seed)
    art = convert(str(ck), profile, out=tmp / f"m-{profile}.cellm").path
    return art, export_onnx(art, tmp / f"onnx-{profile}-{level}", accuracy_level=level)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("onnx-tiny")
    return {p: _build(tmp, tiny_config(), p) for p in PROFILES}


def hf_reference_logits(art: Path, ids: np.ndarray) -> np.ndarray:
    """transformers Gemma3ForCausalLM (float32, eager) on the artifact's dequantized weights."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    with CellmReader(art) as r:
        cfg = r.config
        sd = {n: torch.from_numpy(r.dequantize(n).copy()) for n in r.tensors if not n.endswith((".qscale", ".qzero"))}
    hf_cfg = Gemma3TextConfig(**cfg.to_hf_dict(style=5))
    hf_cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(hf_cfg).eval()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected
    with torch.no_grad():
        return model(torch.from_numpy(ids[None].astype(np.int64)), use_cache=False).logits[0].float().numpy()


def _chunked(model, ids: np.ndarray, cuts: list[int]) -> np.ndarray:
    st = model.new_state()
    bounds = [0] + cuts + [len(ids)]
    return np.concatenate([model.forward(ids[a:b], st) for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("profile", PROFILES)
def test_logits_match_transformers_and_numpy_runtime(exports, profile):
    art, out = exports[profile]
    ids = np.random.default_rng(7).integers(0, 512, size=21)  # window 8 < 21 tokens
    ort_model = load_ort_model(out)
    got = ort_model.forward(ids, ort_model.new_state())
    ref = hf_reference_logits(art, ids)
    assert got.shape == ref.shape == (21, 512)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    np_model = load_model(art)
    assert np.abs(got - np_model.forward(ids, np_model.new_state())).max() < 1e-4


@pytest.mark.parametrize("profile", ["int8-v1", "int4-g32"])
def test_cached_decode_in_chunks_matches_full_sequence(exports, profile):
    _, out = exports[profile]
    m = load_ort_model(out, initial_capacity=4)  # forces several buffer growths
    ids = np.random.default_rng(3).integers(0, 512, size=30)
    full = m.forward(ids, m.new_state())
    np.testing.assert_allclose(_chunked(m, ids, [7] + list(range(8, 30))), full, atol=2e-5, rtol=0)
    np.testing.assert_allclose(_chunked(m, ids, [5, 13, 14, 25]), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("profile", ["f16", "int4-g32"])
def test_linear_rope_scaling_mqa_custom_layer_types(tmp_path, profile):
    art, out = _build(tmp_path, LINEAR_ROPE_CFG, profile, seed=5)
    ids = np.random.default_rng(4).integers(0, 512, size=19)
    m = load_ort_model(out)
    got = _chunked(m, ids, [6, 7, 12])
    ref = hf_reference_logits(art, ids)
    assert np.abs(got - ref).max() < 1e-4


def test_mixed_formats_in_one_attention_block(tmp_path):
    """q symmetric, k/v asymmetric group-wise, o per-row i8, MLP i4: packed or not, same numbers."""
    prof = tmp_path / "mix.toml"
    prof.write_text(
        'name = "mix"\ndescription = "test"\ngate_class = "int4"\n'
        "[[rules]]\npattern = '.*q_proj\\.weight'\nscheme = \"q4g32-sym\"\n"
        "[[rules]]\npattern = '.*[kv]_proj\\.weight'\nscheme = \"q4g32\"\n"
        "[[rules]]\npattern = '.*o_proj\\.weight'\nscheme = \"i8\"\n"
        "[[rules]]\npattern = '.*mlp\\..*\\.weight'\nscheme = \"i4\"\n"
        "[[rules]]\npattern = '.*embed_tokens\\.weight'\nscheme = \"i8\"\n"
        "[[rules]]\npattern = '.*'\nscheme = \"f16\"\n"
    )
    ck = make_checkpoint(tmp_path / "ck", tiny_config(), seed=2)
    art = convert(str(ck), str(prof), out=tmp_path / "mix.cellm").path
    out = export_onnx(art, tmp_path / "onnx", accuracy_level=1)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = {n.name for n in model.graph.node}
    assert "/model/layers.0/attn/qkv_proj/MatMulNBits" in names  # sym q + asym k/v packed (explicit zp 8)
    ids = np.random.default_rng(9).integers(0, 512, size=17)
    m = load_ort_model(out)
    assert np.abs(m.forward(ids, m.new_state()) - hf_reference_logits(art, ids)).max() < 1e-4


def _nbits_dequant(b, scales, zp, k, n, bits, bs):
    """Independent MatMulNBits dequantization: (q - zp) * scale, low nibble first."""
    nb = -(-k // bs)
    raw = b.reshape(n, nb, -1)
    if bits == 4:
        q = np.stack([raw & 15, raw >> 4], axis=-1).reshape(n, nb, bs).astype(np.float32)
        z = np.full((n, nb), 8.0, np.float32) if zp is None else \
            np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb].astype(np.float32)
    else:
        q = raw.astype(np.float32)
        z = np.full((n, nb), 128.0, np.float32) if zp is None else zp[:, :nb].astype(np.float32)
    return ((q - z[:, :, None]) * scales.reshape(n, nb, 1)).reshape(n, -1)[:, :k]


@pytest.mark.parametrize("profile", ["int8-v1", "int4-v1", "int4-g32", "mixed-int4"])
def test_matmulnbits_initializers_dequantize_to_the_artifact_exactly(exports, profile):
    art, out = exports[profile]
    model = onnx.load(str(out / "model.onnx"))  # with external data
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    with CellmReader(art) as r:
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            w = _nbits_dequant(inits[node.input[1]], inits[node.input[2]], zp, a["K"], a["N"], a["bits"], a["block_size"])
            base = node.input[1].removesuffix(".qweight")
            if ".qkv_proj." in base:
                ref = np.concatenate([r.dequantize(base.replace("qkv_proj", f"{p}_proj")) for p in "qkv"])
            elif ".gate_up_proj." in base:
                ref = np.concatenate([r.dequantize(base.replace("gate_up_proj", f"{p}_proj")) for p in ("gate", "up")])
            else:
                ref = r.dequantize(base if base.endswith(".weight") else base + ".weight")
            assert np.array_equal(w, ref), node.name
            checked += 1
    assert checked >= 3


def test_graph_checks_names_io_and_determinism(exports, tmp_path):
    art, out = exports["int4-g32"]
    onnx.checker.check_model(str(out / "model.onnx"))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names)) and all(n.startswith("/") for n in names)
    for want in ("/model/layers.0/attn/qkv_proj/MatMulNBits", "/model/layers.2/mlp/down_proj/MatMulNBits",
                 "/model/layers.1/mlp/gate_up_proj/MatMulNBits",
                 "/model/layers.1/attn/GroupQueryAttention", "/model/embed_tokens/GatherBlockQuantized",
                 "/lm_head/MatMulNBits"):
        assert want in names
    gqa = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
           for n in model.graph.node if n.op_type == "GroupQueryAttention"}
    assert [gqa[f"/model/layers.{i}/attn/GroupQueryAttention"]["local_window_size"] for i in range(3)] == [8, 8, -1]
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    assert ins[:2] == ["input_ids", "attention_mask"] and "past_key_values.2.value" in ins
    assert outs[0] == "logits" and "present.0.key" in outs and len(outs) == 1 + 2 * 3
    assert all(re.fullmatch(r"/model/.*|/lm_head/.*", n) for n in names)
    # the tied embedding is one initializer shared by GatherBlockQuantized and the LM head
    users = [n for n in model.graph.node if "model.embed_tokens.qweight" in n.input]
    assert {n.op_type for n in users} == {"Reshape", "MatMulNBits"}
    again = export_onnx(art, tmp_path / "again", accuracy_level=1)
    for f in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer_config.json"):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f


def test_genai_and_tokenizer_config(exports):
    _, out = exports["int8-v1"]
    g = json.loads((out / "genai_config.json").read_text())
    assert g["model"]["type"] == "gemma3_text"
    assert g["model"]["eos_token_id"] == [1, 106] and g["model"]["bos_token_id"] == 2 and g["model"]["pad_token_id"] == 0
    assert g["model"]["context_length"] == 256 and g["search"]["past_present_share_buffer"] is True
    dec = g["model"]["decoder"]
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (3, 2, 32)
    t = json.loads((out / "tokenizer_config.json").read_text())
    assert t["add_bos_token"] is True and t["bos_token"] == "<bos>" and t["eos_token"] == "<eos>"
    assert (out / "tokenizer.json").is_file() and (out / "NOTICE").is_file()
    assert oct((out / "model.onnx").stat().st_mode & 0o777) != oct(0o600)


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_non_empty_output_needs_force_and_force_replaces(exports, tmp_path):
    art, _ = exports["int8-v1"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(art, out)
    assert _listing(out) == {"keep.txt": b"precious"}
    export_onnx(art, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    export_onnx(art, tmp_path / "empty-ok")  # an absent target is fine; so is an existing empty one
    (tmp_path / "empty").mkdir()
    export_onnx(art, tmp_path / "empty")


def _rewrite(src: Path, dst: Path, edit_header=None, replace: dict | None = None) -> None:
    """Copy a .cellm through CellmWriter with an edited header and/or tensors replaced (name -> (dtype, bytes))."""
    from cellm.format.constants import make_spec
    from cellm.format.writer import CellmWriter

    with CellmReader(src) as r:
        header = {k: v for k, v in json.loads(json.dumps(r.header)).items() if k != "tensors"}
        if edit_header:
            edit_header(header)
        specs, data = [], {}
        for t in r.entries:
            dtype, blob = (replace or {}).get(t.name, (t.dtype, None))
            spec = make_spec(t.name, dtype, t.shape)
            specs.append(spec)
            data[t.name] = np.asarray(r.raw(t.name)) if blob is None else np.frombuffer(blob, np.uint8)
        w = CellmWriter(dst, header, specs)
        for name in sorted(data):
            w.write(name, data[name])
        w.close()


def test_unsupported_architecture_and_dtype_are_export_errors(exports, tmp_path):
    art, _ = exports["int8-v1"]
    llama = tmp_path / "llama.cellm"

    def to_llama(h):
        h["model_type"] = "llama"
        if isinstance(h.get("source_text_config"), dict):
            h["source_text_config"]["model_type"] = "llama"

    _rewrite(art, llama, edit_header=to_llama)
    with pytest.raises(ExportError, match="llama"):
        export_onnx(llama, tmp_path / "o1")
    # a projection stored as a companion-only dtype (u4: packed nibbles, no scale) cannot be mapped
    bad = tmp_path / "u4.cellm"
    from cellm.format.constants import make_spec

    name = "model.layers.0.self_attn.o_proj.weight"
    with CellmReader(art) as r:
        shape = r.tensors[name].shape
    _rewrite(art, bad, replace={name: ("u4", bytes(make_spec(name, "u4", shape).nbytes))})
    with pytest.raises(ExportError, match="u4"):
        export_onnx(bad, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_export_and_generate(exports, tmp_path, capsys):
    from cellm.cli import main

    art, _ = exports["int4-g32"]
    out = tmp_path / "cli"
    assert main(["export-onnx", str(art), "-o", str(out), "--accuracy-level", "1"]) == 0
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert main(["export-onnx", str(art), "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export-onnx", str(art), "-o", str(out), "--force"]) == 0
    assert main(["generate", str(out), "--engine", "onnxruntime", "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert "decode" in capsys.readouterr().err


def test_missing_or_bad_paths(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(tmp_path / "nope.cellm", tmp_path / "o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError):
        export_onnx(tmp_path / "nope.cellm", tmp_path / "file")
    with pytest.raises(ExportError, match="accuracy_level"):
        export_onnx(tmp_path / "nope.cellm", tmp_path / "o", accuracy_level=7)
    assert os.listdir(tmp_path) == ["file"]


def test_context_length_limits_the_engine(exports, tmp_path):
    from cellm.errors import ModelRuntimeError

    art, _ = exports["int8-v1"]
    out = export_onnx(art, tmp_path / "ctx", accuracy_level=1, context_length=16)
    assert json.loads((out / "genai_config.json").read_text())["model"]["context_length"] == 16
    m = load_ort_model(out)
    st = m.new_state()
    m.forward(np.arange(10, 26), st)  # exactly 16 positions
    with pytest.raises(ModelRuntimeError, match="exceeds"):
        m.forward(np.array([5]), st)
    with pytest.raises(ExportError, match="context_length"):
        export_onnx(art, tmp_path / "ctx2", context_length=10**6)


SPLIT_PROFILE = (  # q / k,v / gate / up in layouts that cannot be packed: shared and separate splits
    'name = "split"\ndescription = "test"\ngate_class = "int4"\n'
    "[[rules]]\npattern = '.*q_proj\\.weight'\nscheme = \"i8\"\n"
    "[[rules]]\npattern = '.*[kv]_proj\\.weight'\nscheme = \"q4g32\"\n"
    "[[rules]]\npattern = '.*gate_proj\\.weight'\nscheme = \"q4g32\"\n"
    "[[rules]]\npattern = '.*up_proj\\.weight'\nscheme = \"i4\"\n"
    "[[rules]]\npattern = '.*down_proj\\.weight'\nscheme = \"q4g64\"\n"  # K=160: a padded last block
    "[[rules]]\npattern = '.*o_proj\\.weight'\nscheme = \"q4g32-sym\"\n"
    "[[rules]]\npattern = '.*embed_tokens\\.weight'\nscheme = \"q4g32\"\n"
    "[[rules]]\npattern = '.*'\nscheme = \"f16\"\n"
)


@pytest.mark.parametrize("profile", ["int8-v1", "int4-g64", "split"])
def test_int8_residual_gives_level1_accuracy_at_level4(tmp_path, profile):
    """Level 4 + int8_residual: every MatMulNBits still runs at level 4 (int8 kernels) on [hi; lo] rows,
    and the logits come within float rounding of level 1 — an order of magnitude closer than plain level 4."""
    if profile == "split":
        (tmp_path / "split.toml").write_text(SPLIT_PROFILE)
        profile = str(tmp_path / "split.toml")
    ck = make_checkpoint(tmp_path / "ck", tiny_config(), seed=11)
    art = convert(str(ck), profile, out=tmp_path / "m.cellm").path
    outs = {name: export_onnx(art, tmp_path / name, accuracy_level=lvl, int8_residual=res)
            for name, lvl, res in (("l1", 1, False), ("l4", 4, False), ("l4r", 4, True))}
    ids = np.random.default_rng(12).integers(0, 512, size=21)
    lg = {}
    for name, out in outs.items():
        m = load_ort_model(out)
        lg[name] = _chunked(m, ids, [9, 10])  # prefill, one-token decode, rest
    plain, residual = np.abs(lg["l4"] - lg["l1"]).max(), np.abs(lg["l4r"] - lg["l1"]).max()
    assert residual < 2e-3 and residual * 20 < plain, (residual, plain)

    model = onnx.load(str(outs["l4r"] / "model.onnx"), load_external_data=False)
    mm = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert mm and all(a.i == 4 for n in mm for a in n.attribute if a.name == "accuracy_level")
    assert all("/int8_residual/" in n.input[0] for n in mm)  # every one fed by a split
    splits = {n.input[0] for n in mm}
    concats = [n for n in model.graph.node if n.op_type == "Concat" and "/int8_residual/" in n.name]
    assert len(concats) == len(splits)  # one split per distinct (input, block size), shared by its users
    plain_model = onnx.load(str(outs["l4"] / "model.onnx"), load_external_data=False)
    assert len(mm) == sum(n.op_type == "MatMulNBits" for n in plain_model.graph.node)
    assert json.loads((outs["l4r"] / "cellm_config.json").read_text())["cellm_export"]["int8_residual"] is True


def test_int8_residual_needs_level4(exports, tmp_path):
    art, _ = exports["int4-g32"]
    with pytest.raises(ExportError, match="int8_residual needs accuracy_level 4"):
        export_onnx(art, tmp_path / "o", accuracy_level=1, int8_residual=True)
    assert not (tmp_path / "o").exists()
