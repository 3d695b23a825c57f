"""The registry API: gated publish, resolve, show, list, channels, verified and resumable pulls.

Backends (``file://`` :class:`~cellm.registry.filestore.FileStore`, ``oci://``
:class:`~cellm.registry.oci.OciStore`) only move bytes and names; everything that decides trust
(gates, force records, sha256 verification, atomic placement of pulled files) lives here, once.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import cellm
from cellm.errors import CellmError, IntegrityError, ManifestError, RegistryError, RegistryNotFound
from cellm.errors import UnsafePublishError, VersionExistsError
from cellm.registry.bundle import BundleSpec
from cellm.registry.manifest import MANIFEST_FILE, FileEntry, Manifest, json_safe, sha256_file
from cellm.registry.names import Ref, parse_ref, validate_channel, validate_name, validate_version

DEFAULT_URL = "file://artifacts"
ProgressFn = Callable[[str, str, int], None]  # (event "reused" | "fetched", path, bytes)


def default_registry_url() -> str:
    """``$CELLM_REGISTRY`` or ``file://artifacts`` (relative to the current directory)."""
    return os.environ.get("CELLM_REGISTRY") or DEFAULT_URL


def open_registry(url: str | os.PathLike | None = None) -> "Registry":
    """``file://PATH`` (relative or absolute; a bare path works too) or ``oci://HOST[:PORT]/NAMESPACE``."""
    url = str(url) if url is not None else default_registry_url()
    if url.startswith("oci://"):
        from cellm.registry.oci import OciStore

        return Registry(OciStore.from_url(url))
    if url.startswith("file://"):
        path = url[len("file://"):]
    elif "://" in url:
        raise RegistryError(f"unsupported registry URL {url!r}; use file://PATH or oci://HOST:PORT/NAMESPACE")
    else:
        path = url
    if not path:
        raise RegistryError(f"registry URL {url!r} has an empty path")
    from cellm.registry.filestore import FileStore

    return Registry(FileStore(Path(path), url=url if "://" in url else f"file://{path}"))


def verdict_record(verdict: Any) -> dict | None:
    """A gate verdict as a plain dict: ``cellm.gates.GateVerdict`` (``.passed``, ``.to_dict()``),
    any object with ``.passed``, or a mapping with ``"passed"``. ``None`` stays ``None``."""
    if verdict is None:
        return None
    if isinstance(verdict, Mapping):
        d = dict(verdict)
    elif hasattr(verdict, "to_dict"):
        d = dict(verdict.to_dict())
    elif dataclasses.is_dataclass(verdict):
        d = dataclasses.asdict(verdict)
    elif hasattr(verdict, "passed"):
        d = {"passed": verdict.passed}
    else:
        raise RegistryError(
            f"gate verdict must be a GateVerdict, an object with .passed or a dict with 'passed'; "
            f"got {type(verdict).__name__}"
        )
    if hasattr(verdict, "passed") and not isinstance(verdict, Mapping):
        d["passed"] = bool(verdict.passed) and d.get("passed", True) is True
    if "passed" not in d:
        raise RegistryError(f"gate verdict has no 'passed' field: keys {sorted(d)}")
    d["passed"] = d["passed"] is True
    return json_safe(d)


@dataclasses.dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    path: Path
    fetched: tuple[str, ...]  # files transferred in this call
    reused: tuple[str, ...]  # verified files reused from an interrupted earlier pull


def verify_dir(path: str | os.PathLike) -> Manifest:
    """Re-verify a pulled bundle directory against its ``manifest.json`` (sizes and sha256s)."""
    path = Path(path)
    try:
        data = (path / MANIFEST_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} has no {MANIFEST_FILE}") from exc
    m = Manifest.from_bytes(data, where=str(path / MANIFEST_FILE))
    for e in m.files:
        p = path / e.path
        if not p.is_file():
            raise IntegrityError(f"{p}: missing (expected sha256 {e.sha256}, {e.bytes} bytes)")
        actual = sha256_file(p)
        if actual != e.sha256 or p.stat().st_size != e.bytes:
            raise IntegrityError(
                f"{p}: sha256 mismatch: expected {e.sha256} ({e.bytes} bytes), "
                f"actual {actual} ({p.stat().st_size} bytes)"
            )
    return m


class Registry:
    """A registry over one backend; see :func:`open_registry`."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.url: str = backend.url

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # ------------------------------------------------------------------ publish
    def publish(
        self,
        spec: BundleSpec,
        verdict: Any = None,
        *,
        force_unsafe: bool = False,
        reason: str | None = None,
        channels: Iterable[str] = ("latest",),
    ) -> Manifest:
        """Publish ``spec`` as an immutable version. Requires a passing gate verdict (``verdict`` or
        ``spec.verdict``) unless ``force_unsafe=True`` with a non-empty ``reason``, which is recorded
        in the manifest. Then moves ``channels`` to the new version."""
        channels = tuple(validate_channel(c) for c in channels)
        vrec = verdict_record(verdict if verdict is not None else spec.verdict)
        passed = bool(vrec and vrec["passed"])
        if force_unsafe:
            if not isinstance(reason, str) or not reason.strip():
                raise UnsafePublishError(
                    f"force_unsafe publish of {spec.name}:{spec.version} requires a non-empty reason "
                    "(it is recorded in the manifest)"
                )
        elif not passed:
            why = "no gate verdict was given" if vrec is None else "the gate verdict did not pass"
            checks = (vrec or {}).get("checks") or []
            failed = [c for c in checks if isinstance(c, Mapping) and not c.get("passed", True)]
            raise UnsafePublishError(
                f"refusing to publish {spec.name}:{spec.version}: {why}"
                + (f" (failed checks: {json_safe(failed)})" if failed else "")
                + "; fix the model or publish with force_unsafe=True and a reason"
            )
        if self.backend.has_version(spec.name, spec.version):
            raise VersionExistsError(
                f"{spec.name}:{spec.version} already exists in {self.url}; versions are immutable"
            )
        files: list[tuple[FileEntry, Path]] = []
        for rel, path, role in spec.collect():
            files.append((FileEntry(rel, path.stat().st_size, sha256_file(path), role), path))
        manifest = Manifest(
            name=spec.name,
            version=spec.version,
            profile=spec.profile,
            files=tuple(e for e, _ in files),
            source=json_safe(dict(spec.source)),
            profile_hash=spec.profile_hash,
            gate_config_hash=spec.gate_config_hash,
            package_version=cellm.__version__,
            metrics=json_safe(dict(spec.metrics)),
            verdict=vrec,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            force_unsafe={
                "forced": bool(force_unsafe),
                "reason": reason.strip() if force_unsafe else None,
                "user": _user() if force_unsafe else None,
            },
        )
        self.backend.put_version(spec.name, spec.version, manifest.to_bytes(), files)
        for ch in channels:
            self.backend.set_channel(spec.name, ch, spec.version)
        return manifest

    def copy_to(self, ref: str, dest: "Registry", channels: Iterable[str] = ()) -> Manifest:
        """Copy one published version, manifest bytes unchanged, into ``dest`` (e.g. promote a
        local ``file://`` build to an organisation's ``oci://`` registry). Every file is verified
        on the way; the destination refuses an existing version."""
        channels = tuple(validate_channel(c) for c in channels)
        with tempfile.TemporaryDirectory(prefix="cellm-copy-") as tmp:
            res = self.pull(ref, Path(tmp) / "bundle")
            m = res.manifest
            if not (m.passed or m.forced):
                raise UnsafePublishError(f"{m.name}:{m.version} has neither a passing verdict nor a force record")
            data = (res.path / MANIFEST_FILE).read_bytes()
            dest.backend.put_version(m.name, m.version, data, [(e, res.path / e.path) for e in m.files])
        for ch in channels:
            dest.backend.set_channel(m.name, ch, m.version)
        return m

    # ------------------------------------------------------------------ read side
    def resolve(self, ref: str | Ref) -> tuple[str, str]:
        """``NAME[:VERSION|@CHANNEL]`` -> ``(name, version)``; unknown -> ``RegistryNotFound``."""
        r = ref if isinstance(ref, Ref) else parse_ref(ref)
        if r.version is not None:
            if not self.backend.has_version(r.name, r.version):
                raise RegistryNotFound(
                    f"{r.name}:{r.version} not found in {self.url}; versions of {r.name}: "
                    f"{self.backend.list_versions(r.name)}; names: {self.backend.list_names()}"
                )
            return r.name, r.version
        version = self.backend.get_channel(r.name, r.channel)
        if version is None:
            raise RegistryNotFound(
                f"{r.name}@{r.channel} not found in {self.url}; channels of {r.name}: "
                f"{self.backend.list_channels(r.name)}; names: {self.backend.list_names()}"
            )
        if not self.backend.has_version(r.name, version):
            raise RegistryNotFound(
                f"{r.name}@{r.channel} points to {version}, whose manifest is missing from {self.url}; "
                f"versions of {r.name}: {self.backend.list_versions(r.name)}"
            )
        return r.name, version

    def _manifest(self, name: str, version: str) -> tuple[Manifest, bytes]:
        data = self.backend.read_manifest(name, version)
        m = Manifest.from_bytes(data, where=f"{self.url} {name}:{version} {MANIFEST_FILE}")
        if (m.name, m.version) != (name, version):
            raise ManifestError(
                f"{self.url} {name}:{version}: manifest describes {m.name}:{m.version} instead"
            )
        return m, data

    def show(self, ref: str | Ref) -> Manifest:
        return self._manifest(*self.resolve(ref))[0]

    def list_names(self) -> list[str]:
        return self.backend.list_names()

    def list_versions(self, name: str) -> list[str]:
        return self.backend.list_versions(validate_name(name))

    def list_channels(self, name: str) -> dict[str, str]:
        return self.backend.list_channels(validate_name(name))

    def set_channel(self, name: str, channel: str, version: str) -> None:
        self.backend.set_channel(validate_name(name), validate_channel(channel), validate_version(version))

    # ------------------------------------------------------------------ pull
    def pull(self, ref: str | Ref, out_dir: str | os.PathLike, *, progress: ProgressFn | None = None) -> PullResult:
        """Download a version into ``out_dir`` (absent or empty), verifying every file's size and
        sha256. Files are staged in ``.<out_dir>.partial`` next to it and the directory is renamed
        into place at the end, so ``out_dir`` appears complete or not at all. After an interruption
        a new pull of the same version reuses the staged files that verify and discards the rest;
        an integrity failure removes the staging directory and raises ``IntegrityError``."""
        name, version = self.resolve(ref)
        manifest, data = self._manifest(name, version)
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RegistryError(f"pull output {out} exists and is not an empty directory; nothing was written")
        stage = out.parent / f".{out.name}.partial"
        marker = stage / ".cellm-pull"
        target = f"{self.url} {name}:{version} {hashlib.sha256(data).hexdigest()}\n"
        if stage.exists() and (not marker.is_file() or marker.read_text() != target):
            shutil.rmtree(stage)  # another version / unknown content: restart cleanly
        stage.mkdir(parents=True, exist_ok=True)
        marker.write_text(target)
        wanted = {e.path for e in manifest.files}
        for p in sorted(stage.rglob("*"), reverse=True):  # discard partial files and strangers
            rel = p.relative_to(stage).as_posix()
            if p.is_file() and p != marker and rel not in wanted:
                p.unlink()
        fetched, reused = [], []
        try:
            for e in manifest.files:
                dest = stage / e.path
                if dest.is_file() and dest.stat().st_size == e.bytes and sha256_file(dest) == e.sha256:
                    reused.append(e.path)
                    if progress:
                        progress("reused", e.path, e.bytes)
                    continue
                if dest.exists():
                    dest.unlink()
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._fetch(name, version, e, dest)
                fetched.append(e.path)
                if progress:
                    progress("fetched", e.path, e.bytes)
            _write_synced(stage / MANIFEST_FILE, data)
            marker.unlink()
            if out.exists():
                out.rmdir()
            os.rename(stage, out)
            _fsync_path(out.parent)
        except CellmError:
            shutil.rmtree(stage, ignore_errors=True)  # a verdict, not an interruption: leave nothing
            raise
        return PullResult(manifest, out, tuple(fetched), tuple(reused))

    def _fetch(self, name: str, version: str, e: FileEntry, dest: Path) -> None:
        part = dest.with_name(dest.name + ".part")
        h, n = hashlib.sha256(), 0
        with self.backend.open_file(name, version, e) as chunks, open(part, "wb") as f:
            for block in chunks:
                h.update(block)
                n += len(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != e.sha256 or n != e.bytes:
            part.unlink()
            raise IntegrityError(
                f"{self.url} {name}:{version}: file {e.path!r} failed verification: expected sha256 "
                f"{e.sha256} ({e.bytes} bytes), actual sha256 {h.hexdigest()} ({n} bytes)"
            )
        os.replace(part, dest)


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
