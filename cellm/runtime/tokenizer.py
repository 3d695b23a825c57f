"""Tokenizer from the artifact's ``tokenizer.json`` (``tokenizers`` package) and incremental decoding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from cellm.errors import ModelRuntimeError

CHAT_TEMPLATE = "<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def find_tokenizer(artifact: str | os.PathLike) -> Path:
    """``<stem>.tokenizer.json`` beside a ``.cellm`` file, then ``tokenizer.json`` in the same directory
    (for a directory: ``tokenizer.json`` inside it)."""
    p = Path(artifact)
    cands = [p / "tokenizer.json"] if p.is_dir() else [p.with_name(p.stem + ".tokenizer.json"), p.with_name("tokenizer.json")]
    for c in cands:
        if c.is_file():
            return c
    raise ModelRuntimeError(
        f"no tokenizer for {p}: looked for {', '.join(str(c) for c in cands)} (convert writes <stem>.tokenizer.json)"
    )


class Tokenizer:
    def __init__(self, path_or_json: str | os.PathLike, *, from_str: bool = False):
        from tokenizers import Tokenizer as _T

        try:
            self._tok = _T.from_str(str(path_or_json)) if from_str else _T.from_file(str(path_or_json))
        except Exception as exc:
            raise ModelRuntimeError(f"cannot load tokenizer {'(json)' if from_str else path_or_json}: {exc}") from exc
        self.bos_id = self._tok.token_to_id("<bos>")

    @classmethod
    def for_artifact(cls, artifact) -> "Tokenizer":
        """Tokenizer of a ``.cellm`` file (sidecar), an HF-layout directory, or a source spec / Checkpoint."""
        if hasattr(artifact, "tokenizer_json"):
            return cls.from_any(artifact.tokenizer_json, f"checkpoint {getattr(artifact, 'name', '')}")
        p = Path(artifact)
        if (p.is_file() and p.suffix == ".cellm") or (p.is_dir() and (p / "tokenizer.json").is_file()):
            return cls(find_tokenizer(p))
        from cellm.sources import open_source

        return cls.from_any(open_source(str(artifact)).tokenizer_json, f"source {artifact}")

    @classmethod
    def from_any(cls, tj, where: str) -> "Tokenizer":
        """From a path, JSON text, bytes or a dict."""
        import json

        if tj is None:
            raise ModelRuntimeError(f"{where} has no tokenizer.json")
        if isinstance(tj, dict):
            return cls(json.dumps(tj), from_str=True)
        if isinstance(tj, bytes):
            tj = tj.decode("utf-8")
        if isinstance(tj, str) and tj.lstrip().startswith("{"):
            return cls(tj, from_str=True)
        if not Path(tj).is_file():
            raise ModelRuntimeError(f"{where}: tokenizer file {tj} does not exist")
        return cls(tj)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def chat(self, text: str) -> list[int]:
        """Gemma chat turn for ``text`` (the template starts with its own ``<bos>``)."""
        return self._tok.encode(CHAT_TEMPLATE.format(text=text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)


class IncrementalDecoder:
    """Streams text for a growing token list; holds back incomplete UTF-8 (byte-fallback) sequences.

    Decodes a short window ``ids[prefix:]`` and emits what ``ids[prefix:read]`` did not already
    produce, so decoder rules that depend on context (leading-space stripping, byte fusion) see the
    same neighbours as a full decode.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            out = new[len(prev) :]
            self.prefix, self.read = self.read, len(self.ids)
            return out
        return ""

    def flush(self) -> str:
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new[len(prev) :] if len(new) > len(prev) else ""
