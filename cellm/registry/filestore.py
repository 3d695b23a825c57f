"""``file://`` backend: a content-addressed store on a local (or shared POSIX) filesystem.

Layout under the root::

    cellm-registry.json                           {"format": "cellm-registry", "layout": 1}
    blobs/sha256/<hex>                            file bytes, named by their sha256, read-only
    tmp/                                          temp files (same filesystem, so rename is atomic)
    names/<name>/versions/<version>/manifest.json immutable; its presence IS the version
    names/<name>/channels/<channel>.json          {"version", "manifest_sha256", "updated"}
    names/<name>/channels/<channel>.log           one JSON line per channel move (audit trail)
    names/<name>/.lock                            flock(2) lock serialising channel moves

Atomicity: blobs are written to ``tmp/`` then fsync'd and renamed into place; the manifest is
written to ``tmp/``, fsync'd, then hard-linked to ``versions/<version>/manifest.json``. ``link(2)``
fails if the target exists, so exactly one of several concurrent publishers of a version wins and
no reader ever sees a partial manifest, nor a manifest whose blobs are missing. Channels are
replaced with ``rename(2)`` under an exclusive ``flock`` on the name's lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from cellm.errors import IntegrityError, ManifestError, RegistryError, RegistryNotFound, VersionExistsError
from cellm.registry.manifest import MANIFEST_FILE, FileEntry, sha256_file
from cellm.registry.names import is_channel, is_version, validate_channel, validate_name, validate_version
from cellm.registry.names import version_sort_key

CHUNK = 1 << 20
LAYOUT = {"format": "cellm-registry", "layout": 1}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """One registry root directory. Stateless: every call re-reads the filesystem."""

    def __init__(self, root: str | os.PathLike, url: str | None = None):
        self.root = Path(root)
        self.url = url or f"file://{self.root}"

    # ------------------------------------------------------------------ paths
    def _blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def _name_dir(self, name: str) -> Path:
        return self.root / "names" / validate_name(name)

    def _manifest_path(self, name: str, version: str) -> Path:
        return self._name_dir(name) / "versions" / validate_version(version) / MANIFEST_FILE

    def _channel_path(self, name: str, channel: str) -> Path:
        return self._name_dir(name) / "channels" / f"{validate_channel(channel)}.json"

    def _tmpfile(self) -> tuple[int, Path]:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        fd, p = tempfile.mkstemp(dir=tmp, prefix=".w-")
        return fd, Path(p)

    def _init_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "cellm-registry.json"
        if not marker.exists():
            fd, tmp = self._tmpfile()
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(LAYOUT).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, marker)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()

    # ------------------------------------------------------------------ writes
    def _put_blob(self, entry: FileEntry, src: Path) -> None:
        final = self._blob(entry.sha256)
        if final.is_file():
            if final.stat().st_size == entry.bytes and sha256_file(final) == entry.sha256:
                return  # already stored (content-addressed: same name = same bytes)
            # a corrupt blob: replace it with the right bytes (rename is atomic)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = self._tmpfile()
        h, n = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while block := inp.read(CHUNK):
                    h.update(block)
                    n += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != entry.sha256 or n != entry.bytes:
                raise IntegrityError(
                    f"{src} changed while publishing {entry.path}: expected sha256 {entry.sha256} "
                    f"({entry.bytes} bytes), read sha256 {h.hexdigest()} ({n} bytes)"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(final.parent)

    def has_version(self, name: str, version: str) -> bool:
        return self._manifest_path(name, version).is_file()

    def put_version(
        self, name: str, version: str, manifest_bytes: bytes, files: list[tuple[FileEntry, Path]]
    ) -> None:
        """Store blobs, then create the version by linking its manifest (fails if it exists)."""
        mpath = self._manifest_path(name, version)
        if mpath.exists():
            raise VersionExistsError(f"{name}:{version} already exists in {self.url}; versions are immutable")
        self._init_root()
        for entry, src in files:
            self._put_blob(entry, src)
        fd, tmp = self._tmpfile()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(manifest_bytes)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            mpath.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, mpath)  # atomic "create if absent"
            except FileExistsError as exc:
                raise VersionExistsError(
                    f"{name}:{version} already exists in {self.url} (published concurrently); "
                    "versions are immutable"
                ) from exc
        finally:
            tmp.unlink()
        _fsync_dir(mpath.parent)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        d = self._name_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def set_channel(self, name: str, channel: str, version: str) -> None:
        path = self._channel_path(name, channel)
        mpath = self._manifest_path(name, version)
        with self._locked(name):
            if not mpath.is_file():
                raise RegistryNotFound(
                    f"cannot point {name}@{channel} at {version}: no such version; "
                    f"versions: {self.list_versions(name)}"
                )
            record = {
                "name": name,
                "channel": channel,
                "version": version,
                "manifest_sha256": sha256_file(mpath),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            data = (json.dumps(record, sort_keys=True) + "\n").encode()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = self._tmpfile()
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
            with open(path.with_suffix(".log"), "ab") as log:
                log.write(data)
                log.flush()
                os.fsync(log.fileno())
            _fsync_dir(path.parent)

    # ------------------------------------------------------------------ reads
    def read_manifest(self, name: str, version: str) -> bytes:
        mpath = self._manifest_path(name, version)
        try:
            return mpath.read_bytes()
        except FileNotFoundError as exc:
            raise RegistryNotFound(
                f"{name}:{version} not found in {self.url}; versions of {name}: "
                f"{self.list_versions(name)}; names: {self.list_names()}"
            ) from exc

    @contextlib.contextmanager
    def open_file(self, name: str, version: str, entry: FileEntry) -> Iterator[Iterator[bytes]]:
        blob = self._blob(entry.sha256)
        try:
            f = open(blob, "rb")
        except FileNotFoundError as exc:
            raise IntegrityError(
                f"{name}:{version}: blob sha256:{entry.sha256} of file {entry.path!r} is missing "
                f"from {self.url}"
            ) from exc
        with f:
            yield iter(lambda: f.read(CHUNK), b"")

    def read_channel(self, name: str, channel: str) -> dict | None:
        path = self._channel_path(name, channel)
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"channel file {path} is not valid JSON ({exc})") from exc
        if not isinstance(rec, dict) or not is_version(rec.get("version")):
            raise ManifestError(f"channel file {path} has no valid 'version': {rec!r}")
        return rec

    def get_channel(self, name: str, channel: str) -> str | None:
        rec = self.read_channel(name, channel)
        if rec is None:
            return None
        expected = rec.get("manifest_sha256")
        mpath = self._manifest_path(name, rec["version"])
        if expected and mpath.is_file() and sha256_file(mpath) != expected:
            raise IntegrityError(
                f"{name}@{channel} -> {rec['version']}: manifest {mpath} changed after it was "
                f"published: expected sha256 {expected}, actual {sha256_file(mpath)}"
            )
        return rec["version"]

    def list_channels(self, name: str) -> dict[str, str]:
        d = self._name_dir(name) / "channels"
        if not d.is_dir():
            return {}
        out = {}
        for p in sorted(d.glob("*.json")):
            if is_channel(p.stem):
                rec = self.read_channel(name, p.stem)
                if rec:
                    out[p.stem] = rec["version"]
        return out

    def list_versions(self, name: str) -> list[str]:
        d = self._name_dir(name) / "versions"
        if not d.is_dir():
            return []
        vs = [p.name for p in d.iterdir() if is_version(p.name) and (p / MANIFEST_FILE).is_file()]
        return sorted(vs, key=version_sort_key)

    def list_names(self) -> list[str]:
        d = self.root / "names"
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.iterdir()):
            try:
                validate_name(p.name)
            except RegistryError:
                continue
            if self.list_versions(p.name):
                out.append(p.name)
        return out
