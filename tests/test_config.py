"""Config parsing: both HF config styles, checked against transformers' own Gemma3TextConfig."""

from __future__ import annotations

import json

import pytest

from cellm.config import FULL, SLIDING, GemmaTextConfig, RopeSpec
from cellm.errors import ConfigError
from cellm.synthetic import gemma3_270m_config, tiny_config

# google/gemma-3-270m's published config.json (transformers-4 style)
T4_270M = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144,
}


def _hf_reference(d: dict):
    """transformers' parse of the same dict: the independent reference."""
    transformers = pytest.importorskip("transformers")
    inner = d.get("text_config", d)
    kw = {k: v for k, v in inner.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return transformers.Gemma3TextConfig(**kw)


def _rope_from_hf(hc, kind: str) -> RopeSpec:
    p = hc.rope_parameters[kind]
    return RopeSpec(float(p["rope_theta"]), float(p.get("factor", 1.0)) if p.get("rope_type") == "linear" else 1.0)


@pytest.mark.parametrize(
    "raw",
    [
        T4_270M,
        {**T4_270M, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 168},
        gemma3_270m_config().to_hf_dict(style=5),
        tiny_config().to_hf_dict(style=4),
        tiny_config(rope_global=RopeSpec(1e6, 8.0), layer_types=(FULL, SLIDING, FULL)).to_hf_dict(style=5),
    ],
)
def test_parse_matches_transformers(raw):
    ours = GemmaTextConfig.from_hf(json.loads(json.dumps(raw)))
    hc = _hf_reference(raw)
    assert ours.layer_types == tuple(hc.layer_types)
    assert ours.rope_global == _rope_from_hf(hc, FULL)
    assert ours.rope_local == _rope_from_hf(hc, SLIDING)
    assert ours.query_pre_attn_scalar == hc.query_pre_attn_scalar
    assert ours.sliding_window == hc.sliding_window
    assert ours.head_dim == hc.head_dim
    assert (ours.hidden_size, ours.intermediate_size, ours.vocab_size) == (
        hc.hidden_size, hc.intermediate_size, hc.vocab_size)


def test_270m_facts():
    c = GemmaTextConfig.from_hf(T4_270M)
    assert c.rope_global.theta == 1e6 and c.rope_local.theta == 10000.0
    assert [i for i in range(18) if not c.is_sliding(i)] == [5, 11, 17]
    assert c.attn_scale == 256 ** -0.5
    assert c.rope_for(5) == c.rope_global and c.rope_for(0) == c.rope_local


def test_round_trip_both_styles():
    for cfg in (tiny_config(), tiny_config(rope_global=RopeSpec(1e6, 8.0)), gemma3_270m_config()):
        for style in (4, 5):
            assert GemmaTextConfig.from_hf(cfg.to_hf_dict(style=style)) == cfg


def test_multimodal_wrapper():
    wrapped = {"model_type": "gemma3", "text_config": {k: v for k, v in T4_270M.items() if k != "model_type"}}
    assert GemmaTextConfig.from_hf(wrapped).hidden_size == 640


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"model_type": "llama"}, "unsupported architecture model_type='llama'"),
        ({"hidden_size": -1}, "hidden_size=-1"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads=3"),
        ({"layer_types": ["sliding_attention"]}, "num_hidden_layers=18"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "'yarn' unsupported"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000"),
    ],
)
def test_bad_configs(patch, needle):
    with pytest.raises(ConfigError, match=None) as ei:
        GemmaTextConfig.from_hf({**T4_270M, **patch})
    assert needle in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_missing_key():
    raw = dict(T4_270M)
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        GemmaTextConfig.from_hf(raw)


@pytest.mark.parametrize("patch", [{"rms_norm_eps": "tiny"}, {"eos_token_id": [None]}, {"rope_theta": [1]},
                                   {"layer_types": None, "sliding_window_pattern": "6"}])
def test_wrongly_typed_values_raise_config_error(patch):
    with pytest.raises(ConfigError):
        GemmaTextConfig.from_hf({**T4_270M, **patch})
