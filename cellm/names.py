"""The Gemma-3 text tensor name map: HF weight name -> expected shape, from the config.

This is the single source of truth for "every Gemma-3 tensor present, shapes agree with the config"
(validator), for the GGUF name mapping (sources) and for the runtime/exporter weight lookups.
"""

from __future__ import annotations

from cellm.config import GemmaTextConfig

LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def expected_tensors(cfg: GemmaTextConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a Gemma3ForCausalLM text checkpoint holds (tied LM head: no lm_head.weight)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        for n in LAYER_NORMS:
            out[f"{p}.{n}.weight"] = (h,)
        out[f"{p}.self_attn.q_proj.weight"] = (q_out, h)
        out[f"{p}.self_attn.k_proj.weight"] = (kv_out, h)
        out[f"{p}.self_attn.v_proj.weight"] = (kv_out, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, q_out)
        out[f"{p}.self_attn.q_norm.weight"] = (hd,)
        out[f"{p}.self_attn.k_norm.weight"] = (hd,)
        out[f"{p}.mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        out[f"{p}.mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out
