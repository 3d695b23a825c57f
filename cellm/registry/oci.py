"""``oci://HOST[:PORT]/NAMESPACE`` backend: any OCI distribution registry, through ``oras``.

Each version is one OCI artifact ``HOST/NAMESPACE/<name>:<tag>``:

* every bundle file is a layer (media type per role, ``org.opencontainers.image.title`` = its
  bundle-relative path, digest = ``sha256:<file sha256>``, so the registry content-addresses it);
* ``manifest.json`` is the artifact's config blob (media type
  ``application/vnd.cellm.manifest.v1+json``) and also a layer, so plain ``oras pull`` gets it;
* the version tag is the version with ``+`` mapped to ``_`` (OCI tags forbid ``+``; cellm versions
  forbid ``_``); channels (``latest``, ``stable``) are additional tags whose OCI manifest is
  byte-identical to the version's (same digest).

Immutability: a push is refused when the version tag exists (checked before uploading and again
right before the manifest PUT). The OCI distribution API has no conditional PUT, so two publishers
racing on the same version inside that window can still both succeed; registries with tag
immutability rules (Harbor, ECR, ACR, Artifactory) enforce it server-side. Channel moves are plain
tag PUTs (atomic per tag on the registry side).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterator

from cellm.errors import IntegrityError, ManifestError, RegistryError, RegistryNotFound, VersionExistsError
from cellm.registry.manifest import MANIFEST_FILE, FileEntry
from cellm.registry.names import is_channel, is_version, validate_channel, validate_name, validate_version
from cellm.registry.names import version_sort_key

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CELLM_MANIFEST = "application/vnd.cellm.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.cellm.bundle.v1"
ROLE_MEDIA = {
    "cellm": "application/vnd.cellm.model.v1",
    "onnx": "application/vnd.cellm.onnx.file.v1",
    "tokenizer": "application/vnd.cellm.tokenizer.v1",
    "notice": "text/plain",
    "extra": "application/octet-stream",
}
TITLE = "org.opencontainers.image.title"
VERSION_ANN = "org.opencontainers.image.version"
CHUNKED_ABOVE = 64 << 20  # bytes; smaller blobs go in one PUT (oras reads those into memory)
CHUNK_SIZE = 16 << 20  # bytes per PATCH of a chunked upload
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def version_tag(version: str) -> str:
    return validate_version(version).replace("+", "_")


def tag_version(tag: str) -> str:
    return tag.replace("_", "+")


class OciStore:
    def __init__(self, host: str, namespace: str = "", insecure: bool | None = None, url: str | None = None):
        try:
            import oras.client
        except ImportError as exc:  # pragma: no cover - oras is in the pipeline/test extras
            raise RegistryError("the oci:// backend needs the 'oras' package (pip install oras)") from exc
        if not host:
            raise RegistryError(f"oci:// registry URL needs a host, got {url!r}")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if insecure is None:
            insecure = hostname in LOOPBACK or os.environ.get("CELLM_OCI_INSECURE") == "1"
        self.host, self.namespace = host, namespace.strip("/")
        for part in self.namespace.split("/") if self.namespace else []:
            validate_name(part)
        self.url = url or f"oci://{host}/{self.namespace}".rstrip("/")
        self.scheme = "http" if insecure else "https"
        self.client = oras.client.OrasClient(hostname=host, insecure=insecure)
        self._ping()

    @classmethod
    def from_url(cls, url: str) -> "OciStore":
        rest = url[len("oci://"):]
        host, _, namespace = rest.partition("/")
        return cls(host, namespace, url=url)

    # ------------------------------------------------------------------ http helpers
    def _ping(self) -> None:
        base = f"{self.scheme}://{self.host}/v2/"
        try:
            r = self.client.session.get(base, timeout=10)
        except Exception as exc:  # requests.ConnectionError, SSLError...
            raise RegistryError(f"OCI registry {self.url} is unreachable at {base}: {exc}") from exc
        if r.status_code not in (200, 401):
            raise RegistryError(f"{base} answered HTTP {r.status_code}; not an OCI distribution registry")

    def _repo(self, name: str) -> str:
        name = validate_name(name)
        return f"{self.namespace}/{name}" if self.namespace else name

    def _container(self, name: str, tag: str | None = None):
        ref = f"{self.host}/{self._repo(name)}" + (f":{tag}" if tag else "")
        return self.client.get_container(ref)

    def _v2(self, path: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{path}"

    def _request(self, method: str, url: str, **kw):
        try:
            return self.client.do_request(url, method, **kw)
        except Exception as exc:
            raise RegistryError(f"OCI {method} {url} failed: {exc}") from exc

    def _get_oci_manifest(self, name: str, tag: str) -> bytes | None:
        r = self._request("GET", self._v2(f"{self._repo(name)}/manifests/{tag}"), headers={"Accept": OCI_MANIFEST})
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RegistryError(f"{self.url}: GET manifest {name}:{tag} answered HTTP {r.status_code}: {r.text[:300]}")
        return r.content

    def _put_oci_manifest(self, name: str, tag: str, data: bytes) -> None:
        r = self._request(
            "PUT",
            self._v2(f"{self._repo(name)}/manifests/{tag}"),
            headers={"Content-Type": OCI_MANIFEST},
            data=data,
        )
        if r.status_code not in (200, 201):
            raise RegistryError(f"{self.url}: PUT manifest {name}:{tag} answered HTTP {r.status_code}: {r.text[:300]}")

    def _tags(self, name: str) -> list[str]:
        r = self._request("GET", self._v2(f"{self._repo(name)}/tags/list"))
        if r.status_code == 404:
            return []
        if r.status_code != 200:
            raise RegistryError(f"{self.url}: tag list of {name} answered HTTP {r.status_code}")
        tags = list(r.json().get("tags") or [])
        while "next" in r.links:  # pagination (Link header)
            nxt = urllib.parse.urljoin(self._v2(""), r.links["next"]["url"])
            r = self._request("GET", nxt)
            tags += list(r.json().get("tags") or [])
        return tags

    def _upload(self, name: str, path: Path, layer: dict) -> None:
        chunked = layer["size"] > CHUNKED_ABOVE
        kw = {"chunk_size": CHUNK_SIZE} if chunked else {}
        try:
            resp = self.client.upload_blob(str(path), self._container(name), layer, do_chunked=chunked, **kw)
        except Exception as exc:  # oras raises ValueError / requests errors on a rejected upload
            raise RegistryError(f"{self.url}: upload of {layer['annotations'][TITLE]} failed: {exc}") from exc
        if resp.status_code not in (200, 201, 202):
            raise RegistryError(
                f"{self.url}: upload of {layer['annotations'][TITLE]} ({layer['digest']}) answered "
                f"HTTP {resp.status_code}: {getattr(resp, 'text', '')[:300]}"
            )

    # ------------------------------------------------------------------ backend API
    def has_version(self, name: str, version: str) -> bool:
        r = self._request("HEAD", self._v2(f"{self._repo(name)}/manifests/{version_tag(version)}"),
                          headers={"Accept": OCI_MANIFEST})  # fmt: skip
        return r.status_code == 200

    def put_version(
        self, name: str, version: str, manifest_bytes: bytes, files: list[tuple[FileEntry, Path]]
    ) -> None:
        tag = version_tag(version)
        if self.has_version(name, version):
            raise VersionExistsError(
                f"{name}:{version} already exists in {self.url} (tag {tag}); versions are immutable"
            )
        layers = []
        for e, path in files:
            layer = {
                "mediaType": ROLE_MEDIA[e.role],
                "digest": e.digest,
                "size": e.bytes,
                "annotations": {TITLE: e.path, "vnd.cellm.role": e.role},
            }
            self._upload(name, path, layer)
            layers.append(layer)
        mdigest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        with tempfile.TemporaryDirectory(prefix="cellm-oci-") as tmp:
            mfile = Path(tmp) / MANIFEST_FILE
            mfile.write_bytes(manifest_bytes)
            config = {"mediaType": CELLM_MANIFEST, "digest": mdigest, "size": len(manifest_bytes)}
            self._upload(name, mfile, {**config, "annotations": {TITLE: MANIFEST_FILE}})
        layers.append({**config, "annotations": {TITLE: MANIFEST_FILE, "vnd.cellm.role": "manifest"}})
        meta = json.loads(manifest_bytes)
        oci = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config,
            "layers": layers,
            "annotations": {
                VERSION_ANN: version,
                TITLE: name,
                "org.opencontainers.image.created": str(meta.get("created", "")),
                "vnd.cellm.forced": "true" if (meta.get("force_unsafe") or {}).get("forced") else "false",
            },
        }
        if self.has_version(name, version):  # re-check right before creating the tag
            raise VersionExistsError(f"{name}:{version} was published concurrently to {self.url}")
        self._put_oci_manifest(name, tag, json.dumps(oci, sort_keys=True).encode())

    def set_channel(self, name: str, channel: str, version: str) -> None:
        validate_channel(channel)
        data = self._get_oci_manifest(name, version_tag(version))
        if data is None:
            raise RegistryNotFound(
                f"cannot point {name}@{channel} at {version}: no such version in {self.url}; "
                f"versions: {self.list_versions(name)}"
            )
        self._put_oci_manifest(name, channel, data)  # same bytes -> same digest as the version tag

    def _oci_manifest_json(self, name: str, tag: str) -> dict | None:
        data = self._get_oci_manifest(name, tag)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{self.url} {name}:{tag}: OCI manifest is not JSON ({exc})") from exc

    def read_manifest(self, name: str, version: str) -> bytes:
        oci = self._oci_manifest_json(name, version_tag(version))
        if oci is None:
            raise RegistryNotFound(
                f"{name}:{version} not found in {self.url}; versions of {name}: "
                f"{self.list_versions(name)}; names: {self.list_names()}"
            )
        config = oci.get("config") or {}
        if config.get("mediaType") != CELLM_MANIFEST:
            raise ManifestError(
                f"{self.url} {name}:{version} is not a cellm bundle: config media type "
                f"{config.get('mediaType')!r} (expected {CELLM_MANIFEST!r})"
            )
        digest = str(config.get("digest", ""))
        r = self._request("GET", self._v2(f"{self._repo(name)}/blobs/{digest}"))
        if r.status_code == 404:
            raise ManifestError(f"{self.url} {name}:{version}: {MANIFEST_FILE} blob {digest} is missing")
        if r.status_code != 200:
            raise RegistryError(f"{self.url} {name}:{version}: GET {MANIFEST_FILE} answered HTTP {r.status_code}")
        actual = "sha256:" + hashlib.sha256(r.content).hexdigest()
        if actual != digest:
            raise IntegrityError(
                f"{self.url} {name}:{version}: {MANIFEST_FILE} failed verification: expected {digest}, actual {actual}"
            )
        return r.content

    @contextlib.contextmanager
    def open_file(self, name: str, version: str, entry: FileEntry) -> Iterator[Iterator[bytes]]:
        url = self._v2(f"{self._repo(name)}/blobs/{entry.digest}")
        r = self._request("GET", url, stream=True)
        with r:
            if r.status_code == 404:
                raise IntegrityError(
                    f"{self.url} {name}:{version}: blob {entry.digest} of file {entry.path!r} is missing"
                )
            if r.status_code != 200:
                raise RegistryError(f"{self.url}: GET blob {entry.digest} answered HTTP {r.status_code}")
            yield r.iter_content(chunk_size=1 << 20)

    def get_channel(self, name: str, channel: str) -> str | None:
        oci = self._oci_manifest_json(name, validate_channel(channel))
        if oci is None:
            return None
        v = (oci.get("annotations") or {}).get(VERSION_ANN)
        if not is_version(v):
            raise ManifestError(f"{self.url} {name}@{channel}: OCI manifest has no valid {VERSION_ANN} annotation")
        return v

    def list_channels(self, name: str) -> dict[str, str]:
        out = {}
        for t in sorted(self._tags(name)):
            if is_channel(t):
                v = self.get_channel(name, t)
                if v:
                    out[t] = v
        return out

    def list_versions(self, name: str) -> list[str]:
        vs = [tag_version(t) for t in self._tags(name) if is_version(tag_version(t))]
        return sorted(vs, key=version_sort_key)

    def list_names(self) -> list[str]:
        r = self._request("GET", self._v2("_catalog?n=1000"))
        if r.status_code != 200:
            raise RegistryError(f"{self.url}: catalog answered HTTP {r.status_code}")
        repos = list(r.json().get("repositories") or [])
        while "next" in r.links:
            r = self._request("GET", urllib.parse.urljoin(self._v2(""), r.links["next"]["url"]))
            repos += list(r.json().get("repositories") or [])
        prefix = f"{self.namespace}/" if self.namespace else ""
        names = []
        for repo in repos:
            if repo.startswith(prefix) and "/" not in repo[len(prefix):]:
                n = repo[len(prefix):]
                try:
                    validate_name(n)
                except RegistryError:
                    continue
                if self.list_versions(n):
                    names.append(n)
        return sorted(names)
