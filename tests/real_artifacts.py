"""Real Gemma-3 270M converted with every shipped profile, once per test session (reusable).

Use from any test module::

    from real_artifacts import real_cellm  # noqa: F401  (the session fixture)

    @pytest.mark.real
    def test_something(real_cellm):
        path = real_cellm["mixed-int4-v1"]          # converted lazily, cached for the session

or call ``real_cellm_path(real_ckpt, profile)`` directly. Files live in one session temp dir (removed at exit);
each profile is converted at most once per session (thread-safe), sidecars next to them.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

PROFILES = ("int8-v1", "mixed-int4-v1", "int4-v1", "mixed-int4", "f16", "mixed-int4-gemma3", "mixed-int4-gemma3-270m")
_lock = threading.Lock()
_done: dict[tuple[str, str], Path] = {}
_root: list[Path] = []


def _session_dir() -> Path:
    if not _root:
        _root.append(Path(tempfile.mkdtemp(prefix="cellm-real-artifacts-")))
        atexit.register(shutil.rmtree, _root[0], ignore_errors=True)  # ~2 GB per session: never left behind
    return _root[0]


def real_cellm_path(real_ckpt: Path, profile: str) -> Path:
    """The .cellm of the real 270M converted with ``profile`` (converted on first request)."""
    from cellm.convert import convert

    key = (str(real_ckpt), profile)
    with _lock:
        if key not in _done:
            res = convert(str(real_ckpt), profile, out_dir=_session_dir(), threads=2)
            _done[key] = res.path
        return _done[key]


class _Lazy(dict):
    def __init__(self, ckpt: Path):
        super().__init__()
        self._ckpt = ckpt

    def __missing__(self, profile: str) -> Path:
        p = real_cellm_path(self._ckpt, profile)
        self[profile] = p
        return p


@pytest.fixture(scope="session")
def real_cellm(real_ckpt) -> dict[str, Path]:
    """profile name -> converted .cellm path of the real 270M (lazy, session-cached)."""
    return _Lazy(Path(real_ckpt))
