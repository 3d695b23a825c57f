"""The cellm cache: root directory, file sha256 (with a (size, mtime) keyed sidecar cache), locks,
and ``BUILD.json`` verification for checkpoints cellm builds itself (default model, GGUF sources)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

BUILD_FILE = "BUILD.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cellm cache root: ``cache_dir``, ``$CELLM_CACHE`` or ``~/.cache/cellm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CELLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cellm"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_build(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


def verify_build(path: str | os.PathLike, full: bool = False, builder_version: int | None = None) -> list[str]:
    """Problems with a built checkpoint dir (empty list = good). Sizes always, sha256 if ``full``."""
    path = Path(path)
    build = read_build(path)
    if build is None:
        return [f"{path / BUILD_FILE} missing or unreadable"]
    if builder_version is not None and build.get("builder_version") != builder_version:
        return [f"builder_version {build.get('builder_version')!r} != {builder_version}"]
    problems = []
    files = build.get("files") or {}
    if "model.safetensors" not in files or "config.json" not in files:
        problems.append("BUILD.json lists no model.safetensors / config.json")
    for rel, info in files.items():
        p = path / rel
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != info.get("size"):
            problems.append(f"{rel}: size {size} != recorded {info.get('size')}")
        elif full and sha256_file(p) != info.get("sha256"):
            problems.append(f"{rel}: sha256 differs from BUILD.json")
    return problems




def cached_sha256(path: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of ``path``, remembered in ``<cache>/hashes/`` keyed by (real path, size, mtime_ns).

    Repeated opens of the same unchanged file are instant; a changed file (size or mtime) is rehashed.
    An unwritable cache only costs the speed-up.
    """
    real = Path(os.path.realpath(path))
    st = real.stat()
    key = hashlib.sha256(str(real).encode()).hexdigest()[:40]
    side = cache_root(cache_dir) / "hashes" / f"{key}.json"
    try:
        rec = json.loads(side.read_text())
        if rec.get("path") == str(real) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(real)
    rec = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        side.parent.mkdir(parents=True, exist_ok=True)
        tmp = side.with_name(f"{side.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, side)
    except OSError:
        pass
    return digest


def install_build(staging: Path, target: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Record every file of ``staging`` in BUILD.json (size + sha256), fsync, rename to ``target``.

    An existing ``target`` (a stale or broken build) is moved aside and removed first. The caller
    holds the build lock.
    """
    import shutil

    files = {}
    for p in sorted(staging.iterdir()):
        if p.name != BUILD_FILE:
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    build = dict(meta, files=files)
    (staging / BUILD_FILE).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")
    for p in staging.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        stale = target.parent / f".{target.name}.stale-{os.getpid()}"
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    return build


def remove_stale_staging(parent: Path, name: str) -> None:
    """Remove ``.<name>.build-*`` / ``.<name>.stale-*`` leftovers of killed builders (call under the lock)."""
    import shutil

    if parent.is_dir():
        for p in parent.glob(f".{name}.build-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in parent.glob(f".{name}.stale-*"):
            shutil.rmtree(p, ignore_errors=True)
