"""Build a Hugging Face ``tokenizer.json`` from a Gemma GGUF's SentencePiece-style vocabulary.

A Gemma GGUF stores ``tokenizer.ggml.tokens`` (262144 pieces), ``scores`` and ``token_type`` but no
merges. The resulting tokenizer is the one transformers' GGUF converter builds for Gemma (and the one
Gemma's own ``tokenizer.json`` is): a BPE model with byte fallback, a ``' ' -> '▁'`` normalizer, no
prefix space, and a ``▁ -> ' '`` / ByteFallback / Fuse decoder. Merges are rebuilt from the vocabulary:

* tokens made only of spaces (``"  "``) are stored with real spaces but looked up as ``"▁▁"``, so they
  are respelled first;
* every token is cut into every (left, right) pair whose halves are both in the vocabulary; the pairs
  are ordered by the token's position in the file (Gemma's scores do not follow merge order, its
  position does), then longer left half first, then longer right half first.

Control tokens (type 3) become special added tokens; user-defined ones (type 4) plain added tokens.
Unlike transformers' backend, the post-processor prepends ``<bos>`` (``add_bos`` = the GGUF's
``tokenizer.ggml.add_bos_token``), so ``Tokenizer.encode(text)`` matches Gemma's HF tokenizer.
No dependency beyond the standard library; the result loads with the ``tokenizers`` package.
"""

from __future__ import annotations

from typing import Any, Sequence

from cellm.errors import SourceError

CONTROL, USER_DEFINED = 3, 4
SPACE = "\u2581"


def _respell(token: str) -> str:
    return SPACE * len(token) if " " in token and not token.strip() else token


def derive_merges(tokens: Sequence[str]) -> list[list[str]]:
    """Merges implied by a position-ordered vocabulary (see module doc for the ordering)."""
    vocab = {t: i for i, t in enumerate(tokens)}  # last occurrence wins, like a dict comprehension
    entries: list[tuple[int, int, int, str, str]] = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                entries.append((index, -cut, cut - len(token), left, right))
    # position ascending, then longer left half first, then longer right half first
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    return [[e[3], e[4]] for e in entries]


def _added(index: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": index,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def tokenizer_json_from_vocab(
    tokens: Sequence[str],
    token_types: Sequence[int],
    *,
    bos_id: int,
    unk_id: int,
    add_bos: bool = True,
) -> dict[str, Any]:
    """The ``tokenizer.json`` dict for a Gemma SentencePiece vocabulary taken from a GGUF."""
    if len(tokens) != len(token_types):
        raise SourceError(
            f"GGUF tokenizer has {len(tokens)} tokens but {len(token_types)} token types"
        )
    n = len(tokens)
    for what, idx in (("bos", bos_id), ("unk", unk_id)):
        if not (0 <= idx < n):
            raise SourceError(f"GGUF tokenizer {what}_token_id={idx} outside the vocabulary [0, {n})")
    respelled = [_respell(t) for t in tokens]
    vocab = {t: i for i, t in enumerate(respelled)}
    merges = derive_merges(respelled)

    added: dict[int, dict[str, Any]] = {}
    for i, (tok, tt) in enumerate(zip(tokens, token_types)):
        if tt == CONTROL:
            added[i] = _added(i, tok, True)
    for i, (tok, tt) in enumerate(zip(tokens, token_types)):
        # a user-defined token is added only under its own spelling (respelled space runs are not)
        if tt == USER_DEFINED and tok in vocab and i not in added:
            added[vocab[tok]] = _added(vocab[tok], tok, False)
    bos = respelled[bos_id]
    if add_bos:
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        pair = single + [
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ]
        special = {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}
    else:
        single = [{"Sequence": {"id": "A", "type_id": 0}}]
        pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
        special = {}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added[i] for i in sorted(added)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special,
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": respelled[unk_id],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
