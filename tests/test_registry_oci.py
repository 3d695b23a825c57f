"""oci:// backend against a real OCI registry (Debian's docker-registry) started on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import requests
from registry_server import FAILING, PASSING, free_port, make_spec, start_registry

from cellm.cli import main
from cellm.errors import IntegrityError, RegistryError, RegistryNotFound, UnsafePublishError, VersionExistsError
from cellm.registry import open_registry, verify_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_registry(tmp_path_factory.mktemp("oci-registry"))
    try:
        yield srv
    finally:
        srv.stop()  # always stopped, by PID
    assert srv.proc.poll() is not None


@pytest.fixture
def oci(server, request):
    # one namespace per test: tests do not see each other's artifacts
    return open_registry(server.url(f"t{abs(hash(request.node.name)) % 10**8}"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _digest(server, repo: str, tag: str) -> str:
    r = requests.head(f"http://{server.host}/v2/{repo}/manifests/{tag}",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10)  # fmt: skip
    assert r.status_code == 200
    return r.headers["Docker-Content-Digest"]


def test_oci_publish_pull_roundtrip(oci, tmp_path):
    spec = make_spec(tmp_path / "src")
    m = oci.publish(spec, PASSING, channels=("latest", "stable"))
    assert oci.list_names() == ["tiny-gemma"]
    assert oci.list_versions("tiny-gemma") == ["0.1.0"]
    assert oci.list_channels("tiny-gemma") == {"latest": "0.1.0", "stable": "0.1.0"}
    assert oci.show("tiny-gemma@stable").to_dict() == m.to_dict()
    res = oci.pull("tiny-gemma", tmp_path / "out")
    got = _files(tmp_path / "out")
    assert got["model.cellm"] == spec.cellm_file.read_bytes()
    assert got["onnx/sub/genai_config.json"] == (spec.onnx_dir / "sub/genai_config.json").read_bytes()
    assert json.loads(got["manifest.json"]) == m.to_dict()
    assert len(res.fetched) == 6 and verify_dir(tmp_path / "out").version == "0.1.0"


def test_same_bundle_identical_bytes_through_both_backends(server, oci, tmp_path):
    local = open_registry(f"file://{tmp_path / 'reg'}")
    spec = make_spec(tmp_path / "src", version="0.1.0+abc")  # '+' is mapped to '_' in the OCI tag
    local.publish(spec, PASSING)
    local.copy_to("tiny-gemma:0.1.0+abc", oci, channels=("latest",))
    local.pull("tiny-gemma:0.1.0+abc", tmp_path / "from-file")
    oci.pull("tiny-gemma:0.1.0+abc", tmp_path / "from-oci")
    a, b = _files(tmp_path / "from-file"), _files(tmp_path / "from-oci")
    assert a == b  # every file, manifest.json included, byte-identical
    assert a["model.cellm"] == spec.cellm_file.read_bytes()
    assert oci.list_versions("tiny-gemma") == ["0.1.0+abc"]
    ns = oci.backend.namespace
    assert _digest(server, f"{ns}/tiny-gemma", "latest") == _digest(server, f"{ns}/tiny-gemma", "0.1.0_abc")
    # and back: an OCI version copies into a fresh file:// registry unchanged
    back = open_registry(f"file://{tmp_path / 'reg2'}")
    oci.copy_to("tiny-gemma:0.1.0+abc", back)
    back.pull("tiny-gemma:0.1.0+abc", tmp_path / "back")
    assert _files(tmp_path / "back") == a


def test_oci_versions_are_immutable(server, oci, tmp_path):
    spec = make_spec(tmp_path / "src")
    oci.publish(spec, PASSING)
    repo = f"{oci.backend.namespace}/tiny-gemma"
    before = _digest(server, repo, "0.1.0")
    other = tmp_path / "evil.cellm"
    other.write_bytes(b"replacement")
    with pytest.raises(VersionExistsError, match="already exists"):
        oci.publish(dataclasses.replace(spec, cellm_file=other), PASSING)
    assert _digest(server, repo, "0.1.0") == before
    assert oci.show("tiny-gemma:0.1.0").file("model.cellm").sha256 == hashlib.sha256(
        spec.cellm_file.read_bytes()
    ).hexdigest()


def test_oci_gates_and_force(oci, tmp_path):
    spec = make_spec(tmp_path / "src")
    with pytest.raises(UnsafePublishError):
        oci.publish(spec, FAILING)
    assert oci.list_names() == [] and oci.list_versions("tiny-gemma") == []
    m = oci.publish(spec, FAILING, force_unsafe=True, reason="manual override for a demo")
    assert oci.show("tiny-gemma:0.1.0").force_unsafe["reason"] == "manual override for a demo" and m.forced


def test_oci_channels_move(oci, tmp_path):
    spec = make_spec(tmp_path / "src")
    oci.publish(spec, PASSING, channels=("latest", "stable"))
    other = tmp_path / "v2.cellm"
    other.write_bytes(b"two")
    oci.publish(dataclasses.replace(spec, version="0.2.0", cellm_file=other), PASSING)
    assert oci.list_channels("tiny-gemma") == {"latest": "0.2.0", "stable": "0.1.0"}
    oci.set_channel("tiny-gemma", "stable", "0.2.0")
    assert oci.resolve("tiny-gemma@stable") == ("tiny-gemma", "0.2.0")
    with pytest.raises(RegistryNotFound, match=r"\['0.1.0', '0.2.0'\]"):
        oci.set_channel("tiny-gemma", "stable", "3.0.0")
    with pytest.raises(RegistryNotFound, match=r"versions of tiny-gemma: \['0.1.0', '0.2.0'\]"):
        oci.pull("tiny-gemma:3.0.0", tmp_path / "out")
    with pytest.raises(RegistryNotFound, match="channels of tiny-gemma"):
        oci.pull("tiny-gemma@canary", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_oci_tampered_blob_in_registry_storage(server, oci, tmp_path):
    # unique bytes: the registry stores blobs once for all repositories, so tampering with a
    # shared blob would also corrupt other tests' artifacts (which our pulls would then reject)
    spec = make_spec(tmp_path / "src", seed=987654)
    m = oci.publish(spec, PASSING)
    entry = m.file("model.cellm")
    blob = server.blob_path(entry.sha256)
    data = bytearray(blob.read_bytes())
    data[7] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as ei:
        oci.pull("tiny-gemma:0.1.0", tmp_path / "out")
    msg = str(ei.value)
    assert "model.cellm" in msg and entry.sha256 in msg and hashlib.sha256(data).hexdigest() in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_plain_oras_client_can_pull_the_bundle(server, oci, tmp_path):
    import oras.client

    spec = make_spec(tmp_path / "src")
    oci.publish(spec, PASSING)
    client = oras.client.OrasClient(hostname=server.host, insecure=True)
    target = f"{server.host}/{oci.backend.namespace}/tiny-gemma:0.1.0"
    client.pull(target=target, outdir=str(tmp_path / "oras"))
    got = _files(tmp_path / "oras")
    assert got["model.cellm"] == spec.cellm_file.read_bytes()
    assert got["onnx/model.onnx.data"] == (spec.onnx_dir / "model.onnx.data").read_bytes()
    assert "manifest.json" in got
    assert set(client.get_tags(f"{server.host}/{oci.backend.namespace}/tiny-gemma")) == {"0.1.0", "latest"}


def test_oci_cli_publish_show_pull(server, oci, tmp_path, capsys):
    spec = make_spec(tmp_path / "src")
    verdict = tmp_path / "verdict.json"
    verdict.write_text(json.dumps(PASSING))
    url = oci.url
    assert main(["publish", "tiny-gemma:1.0.0", "--cellm", str(spec.cellm_file), "--onnx", str(spec.onnx_dir),
                 "--verdict", str(verdict), "--registry", url, "--channel", "stable"]) == 0  # fmt: skip
    assert main(["show", "tiny-gemma@stable", "--registry", url]) == 0
    out = capsys.readouterr().out
    assert "tiny-gemma:1.0.0" in out and "PASSED" in out
    assert main(["pull", "tiny-gemma@stable", "-o", str(tmp_path / "out"), "--registry", url]) == 0
    assert (tmp_path / "out/model.cellm").read_bytes() == spec.cellm_file.read_bytes()
    assert (tmp_path / "out/model.tokenizer.json").is_file() and (tmp_path / "out/model.NOTICE").is_file()


def test_unreachable_oci_registry_fails_fast():
    t = time.monotonic()
    with pytest.raises(RegistryError, match="unreachable"):
        open_registry(f"oci://127.0.0.1:{free_port()}/cellm")
    assert time.monotonic() - t < 10


def test_registry_process_is_ours_and_on_loopback(server):
    assert server.proc.poll() is None and server.host.startswith("127.0.0.1:")
    assert os.getpid() != server.proc.pid


def test_chunked_upload_path(oci, tmp_path, monkeypatch):
    import cellm.registry.oci as oci_mod

    monkeypatch.setattr(oci_mod, "CHUNKED_ABOVE", 1000)  # every file above 1 kB goes in chunks
    monkeypatch.setattr(oci_mod, "CHUNK_SIZE", 1500)  # of 1.5 kB: several PATCH requests per file
    spec = make_spec(tmp_path / "src", seed=4242)
    oci.publish(spec, PASSING)
    oci.pull("tiny-gemma:0.1.0", tmp_path / "out")
    assert (tmp_path / "out/model.cellm").read_bytes() == spec.cellm_file.read_bytes()
    assert (tmp_path / "out/onnx/model.onnx.data").read_bytes() == (spec.onnx_dir / "model.onnx.data").read_bytes()
