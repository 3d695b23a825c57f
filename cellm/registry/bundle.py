"""What to publish: a :class:`BundleSpec` names the files of one version by role plus its lineage.

Bundle layout (paths relative to the pulled directory)::

    <stem>.cellm                 role "cellm"      (exactly one)
    <stem>.tokenizer.json ...    role "tokenizer"  (tokenizer files, by basename)
    NOTICE / <stem>.NOTICE       role "notice"     (licence notice of the source model)
    onnx/<relative path>         role "onnx"       (the ONNX export directory, when exported)
    <basename>                   role "extra"
    manifest.json                written by the registry (lists every file above with bytes + sha256)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from cellm.errors import RegistryError
from cellm.registry.manifest import MANIFEST_FILE, check_relpath, sha256_file
from cellm.registry.names import validate_name, validate_version

_PKG_DIR = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class BundleSpec:
    name: str
    version: str
    cellm_file: Path
    profile: str | None = None
    onnx_dir: Path | None = None
    tokenizer_files: tuple[Path, ...] = ()
    notice: Path | None = None
    extra_files: tuple[Path, ...] = ()
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    profile_hash: str | None = None
    gate_config_hash: str | None = None
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    verdict: Any = None  # optional; Registry.publish(spec, verdict) takes precedence

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_version(self.version)
        object.__setattr__(self, "cellm_file", Path(self.cellm_file))
        if self.onnx_dir is not None:
            object.__setattr__(self, "onnx_dir", Path(self.onnx_dir))
        if self.notice is not None:
            object.__setattr__(self, "notice", Path(self.notice))
        object.__setattr__(self, "tokenizer_files", tuple(Path(p) for p in self.tokenizer_files))
        object.__setattr__(self, "extra_files", tuple(Path(p) for p in self.extra_files))

    def collect(self) -> list[tuple[str, Path, str]]:
        """``[(bundle-relative path, local path, role)]`` sorted by path; checks the files exist."""
        out: list[tuple[str, Path, str]] = []

        def add(rel: str, path: Path, role: str) -> None:
            if not path.is_file():
                raise RegistryError(f"bundle {self.name}:{self.version}: {role} file {path} does not exist")
            out.append((check_relpath(rel, f"bundle {self.name}:{self.version}"), path, role))

        if self.cellm_file.suffix != ".cellm":
            raise RegistryError(f"bundle cellm_file must end in .cellm, got {self.cellm_file}")
        add(self.cellm_file.name, self.cellm_file, "cellm")
        for p in self.tokenizer_files:
            add(p.name, p, "tokenizer")
        if self.notice is not None:
            add(self.notice.name, self.notice, "notice")
        for p in self.extra_files:
            add(p.name, p, "extra")
        if self.onnx_dir is not None:
            if not self.onnx_dir.is_dir():
                raise RegistryError(f"bundle onnx_dir {self.onnx_dir} is not a directory")
            found = False
            for root, dirs, files in os.walk(self.onnx_dir):
                dirs.sort()
                for fn in sorted(files):
                    p = Path(root) / fn
                    add("onnx/" + p.relative_to(self.onnx_dir).as_posix(), p, "onnx")
                    found = True
            if not found:
                raise RegistryError(f"bundle onnx_dir {self.onnx_dir} holds no files")
        rels = [r for r, _, _ in out]
        dup = sorted({r for r in rels if rels.count(r) > 1})
        if dup:
            raise RegistryError(f"bundle {self.name}:{self.version}: two files map to the same path {dup}")
        if MANIFEST_FILE in rels:
            raise RegistryError(f"bundle may not contain a file named {MANIFEST_FILE!r}")
        return sorted(out)

    @classmethod
    def from_cellm(
        cls,
        cellm_file: str | os.PathLike,
        name: str,
        version: str,
        *,
        onnx_dir: str | os.PathLike | None = None,
        metrics: Mapping[str, Any] | None = None,
        verdict: Any = None,
        profile: str | None = None,
        source: Mapping[str, Any] | None = None,
        profile_hash: str | None = None,
        gate_config_hash: str | None = None,
    ) -> "BundleSpec":
        """Build a spec from ``cellm convert`` output: finds the ``<stem>.tokenizer.json`` and
        ``<stem>.NOTICE`` sidecars (or ``tokenizer.json`` / ``NOTICE`` next to it) and, when the
        container reader is available, the profile and source provenance from the header."""
        cellm_file = Path(cellm_file)
        stem, parent = cellm_file.with_suffix(""), cellm_file.parent
        tok = [p for p in (Path(f"{stem}.tokenizer.json"), parent / "tokenizer.json") if p.is_file()][:1]
        for extra in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            p = Path(f"{stem}.{extra}")
            if p.is_file():
                tok.append(p)
        notice = next((p for p in (Path(f"{stem}.NOTICE"), parent / "NOTICE") if p.is_file()), None)
        header = read_cellm_header(cellm_file)
        h_name, h_hash, _ = header_profile(header)
        if profile is None:
            profile = h_name
        if source is None:
            source = header.get("cellm_source") or {}
        if profile_hash is None and profile:
            profile_hash = h_hash if profile == h_name and h_hash else profile_file_hash(profile)
        if gate_config_hash is None:
            gate_config_hash = default_gate_config_hash()
        return cls(
            name=name,
            version=version,
            cellm_file=cellm_file,
            profile=profile,
            onnx_dir=Path(onnx_dir) if onnx_dir else None,
            tokenizer_files=tuple(tok),
            notice=notice,
            source=dict(source),
            profile_hash=profile_hash,
            gate_config_hash=gate_config_hash,
            metrics=dict(metrics or {}),
            verdict=verdict,
        )


def read_cellm_header(path: Path) -> dict:
    """The .cellm header dict, or ``{}`` if the container reader is unavailable / the file unreadable
    as a container (the registry treats files as opaque bytes; lineage is best-effort here)."""
    try:
        from cellm.format.reader import CellmReader  # optional: written by the core area
    except ImportError:
        return {}
    try:
        with CellmReader(path) as r:
            return dict(r.header)
    except Exception:  # noqa: BLE001 - lineage extraction is best effort; the bytes are what we publish
        return {}


def header_profile(header: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """``(profile name, profile sha256, gate class)`` from a header's ``cellm_profile`` (a dict
    ``{name, sha256, gate_class}`` as written by ``cellm convert``, or a bare name)."""
    hp = header.get("cellm_profile")
    if isinstance(hp, Mapping):
        return hp.get("name"), hp.get("sha256"), hp.get("gate_class")
    return (hp if isinstance(hp, str) else None), None, None


def profile_file_hash(profile: str) -> str | None:
    """sha256 of ``cellm/profiles/<profile>.toml`` (or of ``profile`` if it is a path), else None."""
    for p in (Path(profile), _PKG_DIR / "profiles" / f"{profile}.toml"):
        if p.is_file():
            return sha256_file(p)
    return None


def default_gate_config_hash() -> str | None:
    p = _PKG_DIR / "gates.toml"
    return sha256_file(p) if p.is_file() else None


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
