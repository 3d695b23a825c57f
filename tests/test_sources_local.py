"""Local HF-layout directory sources: synthetic checkpoints, dtypes, row slices, shards, bad inputs."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from cellm.config import GemmaTextConfig
from cellm.errors import ConfigError, SourceError, SourceNotFoundError
from cellm.names import expected_tensors
from cellm.sources import Checkpoint, open_source
from cellm.synthetic import make_checkpoint, random_weights, tiny_config, write_safetensors


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cellm-cache"))


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """Independent f32 -> bf16 -> f32 (round to nearest even) via ml_dtypes."""
    import ml_dtypes  # installed with onnx

    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("style", [4, 5])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_local_round_trip(tmp_path, style, dtype):
    cfg = tiny_config()
    w = random_weights(cfg, seed=3)
    path = make_checkpoint(tmp_path / "ck", cfg, dtype=dtype, config_style=style, weights=w)
    ck = open_source(str(path))
    assert isinstance(ck, Checkpoint)
    assert ck.name == "ck"
    assert ck.config == GemmaTextConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert ck.config == cfg
    assert ck.tensor_names() == sorted(expected_tensors(cfg))
    for name, ref in w.items():
        got = ck.load(name)
        assert got.dtype == np.float32 and got.shape == ref.shape == ck.shape(name)
        assert ck.dtype(name) == dtype
        if dtype == "F32":
            want = ref
        elif dtype == "F16":
            want = ref.astype(np.float16).astype(np.float32)
        else:
            want = _bf16_round(ref)
        np.testing.assert_array_equal(got, want)
    assert ck.tokenizer_json == path / "tokenizer.json"
    assert ck.raw_config["model_type"] == "gemma3_text"


def test_row_slices_equal_full_load(tiny_ckpt):
    ck = open_source(str(tiny_ckpt))
    name = "model.embed_tokens.weight"
    full = ck.load(name)
    for sl in (slice(0, 1), slice(5, 17), slice(100, None), slice(None, 3), slice(510, 600), slice(7, 7)):
        np.testing.assert_array_equal(ck.load(name, rows=sl), full[sl])
    with pytest.raises(SourceError, match="step"):
        ck.load(name, rows=slice(0, 10, 2))
    norm = ck.load("model.norm.weight", rows=slice(2, 9))
    np.testing.assert_array_equal(norm, ck.load("model.norm.weight")[2:9])


def test_unknown_tensor_names_the_tensor(tiny_ckpt):
    ck = open_source(str(tiny_ckpt))
    with pytest.raises(SourceError, match="model.nope.weight"):
        ck.load("model.nope.weight")


def test_sharded_checkpoint(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, seed=5)
    out = tmp_path / "sharded"
    out.mkdir()
    names = sorted(w)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in shards.items():
        write_safetensors(out / fname, {n: w[n] for n in part}, dtype="BF16")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}})
    )
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(4)))
    ck = open_source(str(out))
    assert ck.weight_files == sorted(shards)
    assert ck.tensor_names() == names
    for n in (names[0], names[-1], "model.embed_tokens.weight"):
        np.testing.assert_array_equal(ck.load(n), _bf16_round(w[n]))
    assert set(ck.provenance["files"]) >= set(shards)


def test_sharded_index_missing_shard(tmp_path):
    path = make_checkpoint(tmp_path / "ck")
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00009.safetensors"}})
    )
    with pytest.raises(SourceError, match="model-00009.safetensors"):
        open_source(str(path))


def test_multimodal_prefix_and_vision_tensors(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, seed=1)
    stored = {("language_model." + n if n.startswith("model.") else n): a for n, a in w.items()}
    stored["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.ones((4, 3), np.float32)
    stored["multi_modal_projector.mm_input_projection_weight"] = np.ones((2, 2), np.float32)
    out = tmp_path / "mm"
    out.mkdir()
    write_safetensors(out / "model.safetensors", stored)
    (out / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": cfg.to_hf_dict(5)}))
    # an extra vision-tower shard in a dtype cellm does not read is ignored, not refused
    header = json.dumps({"vision_tower.pos_ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (out / "vision.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    ck = open_source(str(out))
    assert ck.tensor_names() == sorted(w)
    np.testing.assert_array_equal(ck.load("model.layers.0.self_attn.q_proj.weight"), w["model.layers.0.self_attn.q_proj.weight"])


def test_pickle_only_dir_refused(tmp_path):
    out = tmp_path / "pickled"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_config().to_hf_dict(5)))
    (out / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*only accepts safetensors"):
        open_source(str(out))


def test_missing_config(tmp_path):
    out = tmp_path / "noconfig"
    out.mkdir()
    write_safetensors(out / "model.safetensors", random_weights(tiny_config()))
    with pytest.raises(SourceError, match="config.json is missing"):
        open_source(str(out))


def test_no_weights(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_config().to_hf_dict(5)))
    with pytest.raises(SourceError, match="no \\*.safetensors"):
        open_source(str(out))


def test_unsupported_model_type(tmp_path):
    path = make_checkpoint(tmp_path / "ck")
    raw = json.loads((path / "config.json").read_text())
    raw["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="llama"):
        open_source(str(path))


def test_unknown_safetensors_dtype(tmp_path):
    out = tmp_path / "i64"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_config().to_hf_dict(5)))
    header = json.dumps({"model.norm.weight": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(SourceError, match="I64"):
        open_source(str(out))


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (
            lambda: (h := json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode(),
                     struct.pack("<Q", len(h)) + h + bytes(100))[1],
            "do not fit",
        ),
    ],
)
def test_corrupt_safetensors(tmp_path, blob, match):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_config().to_hf_dict(5)))
    (out / "model.safetensors").write_bytes(blob() if callable(blob) else blob)
    with pytest.raises(SourceError, match=match):
        open_source(str(out))


def test_bad_specs(tmp_path):
    with pytest.raises(SourceNotFoundError, match="hf://org/missing"):
        open_source("org/missing")
    with pytest.raises(SourceNotFoundError):
        open_source(str(tmp_path / "does-not-exist"))
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(SourceError, match="not a .gguf"):
        open_source(str(f))
    with pytest.raises(SourceError, match="revision"):
        open_source(str(tmp_path), revision="abc")


def test_content_hash_and_provenance(tmp_path):
    import hashlib

    path = make_checkpoint(tmp_path / "ck", seed=1)
    ck = open_source(str(path))
    files = {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in ("model.safetensors", "config.json")}
    want = hashlib.sha256(
        "".join(f"{f}\0{files[f]}\n" for f in ("model.safetensors", "config.json")).encode()
    ).hexdigest()
    assert ck.content_hash == want
    prov = ck.provenance
    assert prov["checkpoint_sha256"] == want
    assert prov["files"]["model.safetensors"] == files["model.safetensors"]
    assert prov["spec"] == str(path)
    # a second open reuses the (size, mtime) keyed sidecar; a changed file is rehashed
    assert open_source(str(path)).content_hash == want
    make_checkpoint(path, seed=2)
    assert open_source(str(path)).content_hash != want


def test_checkpoint_is_read_only(tiny_ckpt):
    ck = open_source(str(tiny_ckpt))
    with pytest.raises(AttributeError):
        ck.name = "other"  # type: ignore[misc]
    raw = ck.raw_config
    raw["hidden_size"] = 1
    assert ck.raw_config["hidden_size"] != 1


def test_generated_gemma_notice(tiny_ckpt):
    ck = open_source(str(tiny_ckpt))
    assert "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" in ck.notice.read_text()
