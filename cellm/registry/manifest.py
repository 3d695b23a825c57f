"""``manifest.json``: what one published version holds and where it came from.

The manifest is the single source of truth of a version: every file's relative path, byte count and
sha256, the lineage (source repo / revision / checkpoint hash, profile and gate config hashes,
package version), the metrics and the gate verdict, the creation time, and whether the publish was
forced past the gates (``force_unsafe``). Pulls verify every file against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import PurePosixPath
from typing import Any, Mapping

from cellm.errors import ManifestError
from cellm.registry.names import validate_name, validate_version

SCHEMA = "cellm.registry.manifest/v1"
MANIFEST_FILE = "manifest.json"
ROLES = ("cellm", "onnx", "tokenizer", "notice", "extra")
_HEX64 = re.compile(r"[0-9a-f]{64}")
REQUIRED_KEYS = (
    "schema", "name", "version", "profile", "files", "source", "profile_hash", "gate_config_hash",
    "package_version", "metrics", "verdict", "created", "force_unsafe",
)  # fmt: skip


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_relpath(path: object, where: str = "manifest") -> str:
    """A bundle-relative POSIX path that cannot escape the bundle directory."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: file path must be a non-empty string, got {path!r}")
    p = PurePosixPath(path)
    if (
        p.is_absolute()
        or "\\" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
        or path in (MANIFEST_FILE, ".cellm-pull")
        or any(part.endswith(".part") for part in p.parts)
    ):
        raise ManifestError(
            f"{where}: unsafe or reserved file path {path!r} (must be relative, no '..', '.', "
            f"empty or backslash parts, not {MANIFEST_FILE!r} or '.cellm-pull', no '.part' suffix)"
        )
    return path


def json_safe(value: Any) -> Any:
    """Deep copy into plain JSON types; non-finite floats become strings ("nan", "inf")."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "tolist"):  # numpy arrays / scalars without importing numpy
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    raise ManifestError(f"value {value!r} of type {type(value).__name__} is not JSON-serialisable")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # bundle-relative POSIX path
    bytes: int
    sha256: str  # lowercase hex, no "sha256:" prefix
    role: str = "extra"

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256, "role": self.role}

    @classmethod
    def from_dict(cls, d: object, where: str = "manifest") -> "FileEntry":
        if not isinstance(d, Mapping):
            raise ManifestError(f"{where}: file entry must be an object, got {d!r}")
        for k in ("path", "bytes", "sha256"):
            if k not in d:
                raise ManifestError(f"{where}: file entry {dict(d)!r} is missing key {k!r}")
        path = check_relpath(d["path"], where)
        size, digest, role = d["bytes"], d["sha256"], d.get("role", "extra")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: file {path!r} has invalid bytes {size!r} (int >= 0)")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ManifestError(f"{where}: file {path!r} has invalid sha256 {digest!r} (64 lowercase hex)")
        if role not in ROLES:
            raise ManifestError(f"{where}: file {path!r} has unknown role {role!r} (one of {ROLES})")
        return cls(path, size, digest, role)


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    profile: str | None
    files: tuple[FileEntry, ...]
    source: dict
    profile_hash: str | None
    gate_config_hash: str | None
    package_version: str
    metrics: dict
    verdict: dict | None
    created: str  # ISO-8601 UTC
    force_unsafe: dict  # {"forced": bool, "reason": str | None, "user": str | None}
    schema: str = SCHEMA

    @property
    def forced(self) -> bool:
        return bool(self.force_unsafe.get("forced"))

    @property
    def passed(self) -> bool:
        return bool(self.verdict and self.verdict.get("passed") is True)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def to_dict(self) -> dict:
        d = {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "profile": self.profile,
            "files": [f.to_dict() for f in self.files],
            "source": self.source,
            "profile_hash": self.profile_hash,
            "gate_config_hash": self.gate_config_hash,
            "package_version": self.package_version,
            "metrics": self.metrics,
            "verdict": self.verdict,
            "created": self.created,
            "force_unsafe": self.force_unsafe,
        }
        return json_safe(d)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_dict(cls, d: object, where: str = "manifest") -> "Manifest":
        if not isinstance(d, Mapping):
            raise ManifestError(f"{where}: must be a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing required keys {missing}")
        if d["schema"] != SCHEMA:
            raise ManifestError(f"{where}: unsupported schema {d['schema']!r} (expected {SCHEMA!r})")
        try:
            name, version = validate_name(d["name"]), validate_version(d["version"])
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        if not isinstance(d["files"], list) or not d["files"]:
            raise ManifestError(f"{where}: 'files' must be a non-empty list, got {d['files']!r}")
        files = tuple(FileEntry.from_dict(f, where) for f in d["files"])
        paths = [f.path for f in files]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise ManifestError(f"{where}: duplicate file paths {dup}")
        # a file may not also be a directory of another entry ("a" and "a/b")
        prefixes = {str(p) for f in files for p in PurePosixPath(f.path).parents}
        clash = sorted(set(paths) & prefixes)
        if clash:
            raise ManifestError(f"{where}: paths {clash} are both files and directories")
        for key, typ in (("source", dict), ("metrics", dict), ("force_unsafe", dict)):
            if not isinstance(d[key], dict):
                raise ManifestError(f"{where}: {key!r} must be an object, got {d[key]!r}")
        if d["verdict"] is not None and not isinstance(d["verdict"], dict):
            raise ManifestError(f"{where}: 'verdict' must be an object or null, got {d['verdict']!r}")
        for key in ("created", "package_version"):
            if not isinstance(d[key], str):
                raise ManifestError(f"{where}: {key!r} must be a string, got {d[key]!r}")
        return cls(
            name=name,
            version=version,
            profile=d["profile"],
            files=files,
            source=dict(d["source"]),
            profile_hash=d["profile_hash"],
            gate_config_hash=d["gate_config_hash"],
            package_version=d["package_version"],
            metrics=dict(d["metrics"]),
            verdict=None if d["verdict"] is None else dict(d["verdict"]),
            created=d["created"],
            force_unsafe=dict(d["force_unsafe"]),
            schema=d["schema"],
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> "Manifest":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_dict(obj, where)

    def summary_lines(self) -> list[str]:
        """Human-readable summary (used by ``cellm show``)."""
        v = self.verdict or {}
        lines = [
            f"{self.name}:{self.version}",
            f"  profile:          {self.profile}",
            f"  created:          {self.created}",
            f"  package version:  {self.package_version}",
            f"  source:           " + ", ".join(f"{k}={val}" for k, val in sorted(self.source.items())),
            f"  profile hash:     {self.profile_hash}",
            f"  gate config hash: {self.gate_config_hash}",
            f"  gate verdict:     {'PASSED' if self.passed else 'NOT PASSED'}"
            + (f" (class {v.get('gate_class')})" if v.get("gate_class") else ""),
        ]
        if self.forced:
            lines.append(
                f"  FORCE-UNSAFE:     published past the gates by {self.force_unsafe.get('user')}: "
                f"{self.force_unsafe.get('reason')}"
            )
        if self.metrics:
            lines.append("  metrics:")
            for k, val in sorted(self.metrics.items()):
                lines.append(f"    {k}: {val}")
        checks = v.get("checks")
        if isinstance(checks, list) and checks:
            lines.append("  gate checks:")
            for c in checks:
                lines.append(f"    {c}")
        elif isinstance(checks, dict) and checks:
            lines.append("  gate checks:")
            for k, c in sorted(checks.items()):
                lines.append(f"    {k}: {c}")
        lines.append(f"  files ({len(self.files)}, {self.total_bytes} bytes):")
        for f in self.files:
            lines.append(f"    {f.sha256[:16]}  {f.bytes:>12}  {f.role:<9} {f.path}")
        return lines
