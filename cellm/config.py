"""Gemma-3 text config: one frozen dataclass parsed from either Hugging Face config style.

transformers-4 style: flat ``rope_theta`` (global base), ``rope_local_base_freq`` (sliding base),
``rope_scaling`` ({"rope_type": "linear", "factor": 8.0} or null) and ``sliding_window_pattern``.
transformers-5 style: ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``.
Both may come wrapped in a multimodal ``gemma3`` config under ``text_config``.

Everything downstream (converter, validator, numpy runtime, ONNX exporter) reads this object, never
the raw dict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from cellm.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_MODEL_TYPES = ("gemma3_text", "gemma3")

# Limits that reject obviously corrupt configs before anything allocates memory.
MAX_DIM = 1 << 20
MAX_LAYERS = 1024


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """RoPE for one layer kind: base frequency and linear position scaling factor (1.0 = none)."""

    theta: float
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class GemmaTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_global: RopeSpec  # full-attention layers
    rope_local: RopeSpec  # sliding-attention layers
    sliding_window: int
    layer_types: tuple[str, ...]
    query_pre_attn_scalar: float
    max_position_embeddings: int = 32768
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    model_type: str = "gemma3_text"

    # ------------------------------------------------------------------ derived
    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope_for(self, layer: int) -> RopeSpec:
        return self.rope_local if self.is_sliding(layer) else self.rope_global

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> "GemmaTextConfig":
        """Parse a HF ``config.json`` dict (gemma3 or gemma3_text, transformers 4 or 5 style)."""
        try:
            return cls._from_hf(raw)
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed Gemma-3 config: {exc}") from exc

    @classmethod
    def _from_hf(cls, raw: Mapping[str, Any]) -> "GemmaTextConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        outer_type = str(raw.get("model_type", ""))
        cfg: Mapping[str, Any] = raw
        if "text_config" in raw and isinstance(raw["text_config"], Mapping):
            cfg = dict(raw["text_config"])
            cfg.setdefault("model_type", "gemma3_text")
        model_type = str(cfg.get("model_type", outer_type))
        if not model_type.startswith("gemma3"):
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ConfigError(f"config is missing required key {key!r} (model_type={model_type})")
            return cfg[key]

        def dim(key: str, default: Any = None, limit: int = MAX_DIM) -> int:
            v = cfg.get(key, default) if default is not None else need(key)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, int) or not (1 <= v <= limit):
                raise ConfigError(f"config {key}={v!r} must be an integer in [1, {limit}]")
            return int(v)

        hidden = dim("hidden_size")
        heads = dim("num_attention_heads")
        n_layers = dim("num_hidden_layers", limit=MAX_LAYERS)
        head_dim = dim("head_dim", hidden // heads if hidden % heads == 0 else None)
        kv_heads = dim("num_key_value_heads", heads)
        if heads % kv_heads != 0:
            raise ConfigError(
                f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}"
            )
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        if not (0 < eps < 1):
            raise ConfigError(f"config rms_norm_eps={eps!r} must be in (0, 1)")

        rope_global, rope_local = _parse_rope(cfg)
        sliding_window = dim("sliding_window", 4096, limit=1 << 24)
        layer_types = _parse_layer_types(cfg, n_layers)

        qpas = cfg.get("query_pre_attn_scalar", head_dim)
        if qpas is None or not isinstance(qpas, (int, float)) or not qpas > 0:
            raise ConfigError(f"config query_pre_attn_scalar={qpas!r} must be a positive number")

        eos = cfg.get("eos_token_id", raw.get("eos_token_id", [1, 106]))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        bos = cfg.get("bos_token_id", raw.get("bos_token_id", 2))
        pad = cfg.get("pad_token_id", raw.get("pad_token_id", 0))

        softcap = cfg.get("final_logit_softcapping")
        attn_softcap = cfg.get("attn_logit_softcapping")
        tie = cfg.get("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        return cls(
            vocab_size=dim("vocab_size", limit=1 << 24),
            hidden_size=hidden,
            intermediate_size=dim("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_global=rope_global,
            rope_local=rope_local,
            sliding_window=sliding_window,
            layer_types=layer_types,
            query_pre_attn_scalar=float(qpas),
            max_position_embeddings=dim("max_position_embeddings", 32768, limit=1 << 24),
            bos_token_id=int(bos if bos is not None else 2),
            eos_token_ids=eos_ids,
            pad_token_id=int(pad if pad is not None else 0),
            tie_word_embeddings=bool(tie if tie is not None else True),
            hidden_activation=str(cfg.get("hidden_activation") or "gelu_pytorch_tanh"),
            final_logit_softcapping=None if softcap is None else float(softcap),
            attn_logit_softcapping=None if attn_softcap is None else float(attn_softcap),
            model_type="gemma3_text",
        )

    # ------------------------------------------------------------------ emitting
    def to_hf_dict(self, style: int = 5) -> dict[str, Any]:
        """A ``gemma3_text`` config.json dict in transformers-4 (style=4) or -5 (style=5) form."""
        d: dict[str, Any] = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "query_pre_attn_scalar": (
                int(self.query_pre_attn_scalar)
                if float(self.query_pre_attn_scalar).is_integer()
                else self.query_pre_attn_scalar
            ),
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_activation": self.hidden_activation,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if style == 4:
            d["rope_theta"] = self.rope_global.theta
            d["rope_local_base_freq"] = self.rope_local.theta
            d["rope_scaling"] = (
                None
                if self.rope_global.factor == 1.0
                else {"rope_type": "linear", "factor": self.rope_global.factor}
            )
        elif style == 5:
            d["rope_parameters"] = {
                FULL: _rope_params(self.rope_global),
                SLIDING: _rope_params(self.rope_local),
            }
        else:
            raise ConfigError(f"style={style!r} must be 4 or 5")
        return d


def _rope_params(spec: RopeSpec) -> dict[str, Any]:
    if spec.factor == 1.0:
        return {"rope_type": "default", "rope_theta": spec.theta}
    return {"rope_type": "linear", "rope_theta": spec.theta, "factor": spec.factor}


def _parse_one_rope(params: Any, where: str) -> RopeSpec:
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where} must be an object, got {params!r}")
    theta = params.get("rope_theta")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"{where}.rope_theta={theta!r} must be a positive number")
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    factor = 1.0
    if rtype == "linear":
        factor = float(params.get("factor", 1.0))
    elif rtype != "default":
        raise ConfigError(f"{where}.rope_type={rtype!r} unsupported; supported: default, linear")
    if not (factor > 0 and math.isfinite(factor)):
        raise ConfigError(f"{where}.factor={factor!r} must be a positive finite number")
    return RopeSpec(theta=float(theta), factor=factor)


def _parse_rope(cfg: Mapping[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and (FULL in rp or SLIDING in rp):
        glob = _parse_one_rope(rp.get(FULL, {"rope_theta": 1_000_000.0}), f"rope_parameters.{FULL}")
        loc = _parse_one_rope(rp.get(SLIDING, {"rope_theta": 10_000.0}), f"rope_parameters.{SLIDING}")
        return glob, loc
    if isinstance(rp, Mapping) and "rope_theta" in rp:  # single-dict transformers-5 form
        glob = _parse_one_rope(rp, "rope_parameters")
        return glob, RopeSpec(float(cfg.get("rope_local_base_freq", 10_000.0)))
    theta = cfg.get("rope_theta", 1_000_000.0)
    scaling = cfg.get("rope_scaling")
    params: dict[str, Any] = {"rope_theta": theta}
    if isinstance(scaling, Mapping):
        params.update({k: v for k, v in scaling.items() if k in ("rope_type", "type", "factor")})
    glob = _parse_one_rope(params, "rope_theta/rope_scaling")
    loc = _parse_one_rope(
        {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}, "rope_local_base_freq"
    )
    return glob, loc


def _parse_layer_types(cfg: Mapping[str, Any], n_layers: int) -> tuple[str, ...]:
    lt = cfg.get("layer_types")
    if lt is not None:
        if not isinstance(lt, (list, tuple)) or len(lt) != n_layers:
            raise ConfigError(
                f"layer_types has {len(lt) if isinstance(lt, (list, tuple)) else lt!r} entries; "
                f"num_hidden_layers={n_layers}"
            )
        bad = [t for t in lt if t not in (SLIDING, FULL)]
        if bad:
            raise ConfigError(f"layer_types contains {bad[0]!r}; allowed: {SLIDING}, {FULL}")
        return tuple(lt)
    pattern = cfg.get("sliding_window_pattern", 6)
    if not isinstance(pattern, int) or pattern < 1:
        raise ConfigError(f"sliding_window_pattern={pattern!r} must be a positive integer")
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))
