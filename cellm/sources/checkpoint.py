"""``Checkpoint``: read-only view of a Hugging Face layout directory (config + safetensors).

Tensors are read with plain ``os.pread`` calls into preallocated buffers (only the requested rows),
converted from F32 / F16 / BF16 to float32; no file stays mapped, so a converter that streams tensor by
tensor keeps its resident memory near one tensor. Sharded checkpoints (``model.safetensors.index.json``)
are supported; headers are parsed here, so offsets are known without loading anything.

Multimodal Gemma-3 checkpoints work too: ``language_model.model.*`` / ``model.language_model.*`` names
are mapped to ``model.*``, and vision-tower / projector tensors are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import ConfigError, SourceError
from cellm.sources.cache import cache_root, cached_sha256
from cellm.sources.safetensors_io import StEntry, read_header, read_rows

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
NOTICE_NAMES = ("NOTICE", "NOTICE.md", "NOTICE.txt")
_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
)


def text_name(stored: str) -> str | None:
    """The ``model.*`` text-model name of a stored tensor name (None for vision tensors)."""
    if stored.startswith(_IGNORED):
        return None
    for old, new in _PREFIXES:
        if stored.startswith(old):
            return new + stored[len(old) :]
    return stored


def pickle_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def refuse_pickle(where: str, names: list[str]) -> SourceError:
    return SourceError(
        f"{where} only has pickle weights ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); "
        "cellm only accepts safetensors weights (pickle files can execute code when loaded). "
        "Convert them to safetensors first."
    )


class Checkpoint:
    """An opened HF-layout checkpoint. Attributes are read-only; tensors are read on demand."""

    __slots__ = (
        "_path", "_name", "_raw", "_config", "_entries", "_base_prov", "_known", "_hashes", "_files",
    )

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        known_hashes: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        p = Path(path)
        if not p.is_dir():
            raise SourceError(f"checkpoint directory {p} does not exist or is not a directory")
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{p} is not a Hugging Face checkpoint: config.json is missing")
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{cfg_path}: cannot parse config.json: {exc}") from exc
        try:
            config = GemmaTextConfig.from_hf(raw)
        except ConfigError as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from exc
        files = self._weight_files(p)
        entries: dict[str, StEntry] = {}
        for f in files:
            stored, _meta = read_header(p / f, keep=lambda n: text_name(n) is not None)
            for sname, entry in stored.items():
                tname = text_name(sname)
                if tname is None:
                    continue
                if tname in entries:
                    raise SourceError(f"{p}: tensor {tname!r} appears twice (in {entries[tname].path.name} and {f})")
                entries[tname] = StEntry(tname, entry.path, entry.dtype, entry.shape, entry.offset, entry.nbytes)
        if not entries:
            raise SourceError(f"{p}: the safetensors files hold no text-model tensors")
        self._path = p
        self._name = name or p.name
        self._raw = raw
        self._config = config
        self._entries = entries
        self._files = files
        self._base_prov = dict(provenance or {})
        self._known = {k: dict(v) for k, v in (known_hashes or {}).items()}
        self._hashes: dict[str, str] = {}

    @staticmethod
    def _weight_files(p: Path) -> list[str]:
        index = p / INDEX_FILE
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                files = sorted(set(wmap.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SourceError(f"{index}: bad safetensors index: {exc}") from exc
            missing = [f for f in files if not (p / f).is_file()]
            if missing:
                raise SourceError(f"{index} lists shard {missing[0]!r} which is missing from {p}")
            return files
        files = sorted(f.name for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            pickles = pickle_files(p)
            if pickles:
                raise refuse_pickle(str(p), pickles)
            raise SourceError(f"{p} has config.json but no *.safetensors weights")
        return files

    # ------------------------------------------------------------------ attributes
    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def raw_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._raw))  # a copy: the checkpoint stays immutable

    @property
    def config(self) -> GemmaTextConfig:
        return self._config

    @property
    def weight_files(self) -> list[str]:
        return list(self._files)

    def tensor_names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str) -> StEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise SourceError(
                f"tensor {name!r} not in checkpoint {self._path} ({len(self._entries)} tensors)"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """Source storage dtype: 'F32', 'F16' or 'BF16'."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def load(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor ``name`` (or rows ``rows`` of its first axis) as float32, read from disk now."""
        return read_rows(self._entry(name), rows)

    @property
    def tokenizer_json(self) -> Path | None:
        p = self._path / "tokenizer.json"
        return p if p.is_file() else None

    @property
    def notice(self) -> Path | None:
        """The licence NOTICE to carry along: the checkpoint's own, else a generated Gemma NOTICE."""
        for n in NOTICE_NAMES:
            if (self._path / n).is_file():
                return self._path / n
        if not str(self._config.model_type).startswith("gemma"):
            return None
        target = cache_root() / "notices" / "gemma-terms.NOTICE"
        text = (
            f"{GEMMA_NOTICE}\n\nUse restrictions: use of this model and of anything built from it is "
            "subject to the use restrictions of the Gemma Terms of Use and the Gemma Prohibited Use "
            "Policy at ai.google.dev/gemma/prohibited_use_policy. Redistributions must carry them on.\n"
        )
        try:
            if not target.is_file() or target.read_text() != text:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
                tmp.write_text(text)
                os.replace(tmp, target)
        except OSError:
            return None
        return target

    # ------------------------------------------------------------------ hashing / provenance
    def file_sha256(self, rel: str) -> str:
        if rel not in self._hashes:
            p = self._path / rel
            known = self._known.get(rel)
            if known and known.get("sha256") and known.get("size") == p.stat().st_size:
                self._hashes[rel] = str(known["sha256"])
            else:
                self._hashes[rel] = cached_sha256(p)
        return self._hashes[rel]

    @property
    def content_hash(self) -> str:
        """sha256 over the weight files' sha256s and config.json's sha256 (names included)."""
        h = hashlib.sha256()
        for rel in [*self._files, "config.json"]:
            h.update(f"{rel}\0{self.file_sha256(rel)}\n".encode())
        return h.hexdigest()

    @property
    def provenance(self) -> dict[str, Any]:
        prov: dict[str, Any] = {
            "spec": str(self._path),
            "repo": None,
            "revision": None,
            "commit": None,
        }
        prov.update(self._base_prov)
        files = {rel: self.file_sha256(rel) for rel in [*self._files, "config.json"]}
        if self.tokenizer_json is not None:
            files["tokenizer.json"] = self.file_sha256("tokenizer.json")
        prov["checkpoint_sha256"] = self.content_hash
        prov["files"] = files
        return prov

    def __repr__(self) -> str:
        return f"Checkpoint(name={self._name!r}, path={str(self._path)!r}, tensors={len(self._entries)})"
