"""``genai_config.json`` and ``tokenizer_config.json`` for onnxruntime-genai (checked against 0.18).

The layout is what onnxruntime-genai's model builder writes for Gemma-3 (``type: gemma3_text``),
with two deliberate differences:

* no ``decoder.sliding_window`` section: our graph keeps full-length KV buffers on every layer and
  lets GroupQueryAttention's ``local_window_size`` mask the window (the builder's window-sized ring
  cache needs ``sliding_window_cache=1`` graphs and breaks for caches shorter than the window);
* ``tokenizer_config.json`` carries ``add_bos_token: true`` and the special tokens, so
  transformers-style consumers add ``<bos>``. onnxruntime-genai's ``Tokenizer.encode`` adds no
  special tokens by default (since 0.8): call ``tokenizer.update_options(add_special_tokens="true")``
  or start the prompt with the literal ``<bos>`` — both give token 2 first (tests prove it).
"""

from __future__ import annotations

from typing import Any

from cellm.config import GemmaTextConfig


def make_genai_config(cfg: GemmaTextConfig, context_length: int, filename: str = "model.onnx") -> dict[str, Any]:
    eos = [int(e) for e in cfg.eos_token_ids]
    return {
        "model": {
            "bos_token_id": int(cfg.bos_token_id),
            "context_length": int(context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(cfg.pad_token_id),
            "type": "gemma3_text",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(context_length),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def _token(tok: dict[str, Any], token_id: int, fallback: str) -> str:
    for t in tok.get("added_tokens") or []:
        if t.get("id") == token_id:
            return str(t.get("content"))
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for k, v in vocab.items():
            if v == token_id:
                return str(k)
    return fallback


def make_tokenizer_config(cfg: GemmaTextConfig, tokenizer_json: dict[str, Any], context_length: int) -> dict[str, Any]:
    """A transformers/onnxruntime-extensions ``tokenizer_config.json`` that keeps ``<bos>``."""
    eos0 = int(cfg.eos_token_ids[0]) if cfg.eos_token_ids else 1
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _token(tokenizer_json, cfg.bos_token_id, "<bos>"),
        "eos_token": _token(tokenizer_json, eos0, "<eos>"),
        "pad_token": _token(tokenizer_json, cfg.pad_token_id, "<pad>"),
        "unk_token": _token(tokenizer_json, 3, "<unk>"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context_length),
        "tokenizer_class": "GemmaTokenizer",
    }
