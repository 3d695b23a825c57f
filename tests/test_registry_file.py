"""file:// registry: bundle manifests, gated publish, layout, channels, verified pulls, bad input."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import pytest
from registry_server import FAILING, PASSING, make_spec

import cellm
from cellm.errors import (
    IntegrityError,
    InvalidNameError,
    ManifestError,
    RegistryError,
    RegistryNotFound,
    UnsafePublishError,
    VersionExistsError,
)
from cellm.registry import BundleSpec, open_registry, verify_dir

EXPECTED_PATHS = {
    "model.cellm": "cellm",
    "model.tokenizer.json": "tokenizer",
    "model.NOTICE": "notice",
    "onnx/model.onnx": "onnx",
    "onnx/model.onnx.data": "onnx",
    "onnx/sub/genai_config.json": "onnx",
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _source_files(spec: BundleSpec) -> dict[str, Path]:
    out = {spec.cellm_file.name: spec.cellm_file, spec.notice.name: spec.notice}
    out.update({p.name: p for p in spec.tokenizer_files})
    for p in spec.onnx_dir.rglob("*"):
        if p.is_file():
            out["onnx/" + p.relative_to(spec.onnx_dir).as_posix()] = p
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the registry root (except temp/lock files) with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "tmp" not in p.relative_to(root).parts and p.name != ".lock"
    }


@pytest.fixture
def reg(tmp_path):
    return open_registry(f"file://{tmp_path / 'reg'}")


@pytest.fixture
def spec(tmp_path):
    return make_spec(tmp_path / "src")


# ---------------------------------------------------------------------- bundle + manifest
def test_manifest_records_files_and_lineage(reg, spec):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    m = reg.publish(spec, PASSING)
    after = dt.datetime.now(dt.timezone.utc)
    stored = json.loads((reg.backend.root / "names/tiny-gemma/versions/0.1.0/manifest.json").read_bytes())
    assert stored == m.to_dict()
    assert stored["name"] == "tiny-gemma" and stored["version"] == "0.1.0" and stored["profile"] == "int8-v1"
    src = _source_files(spec)
    assert {f["path"]: f["role"] for f in stored["files"]} == EXPECTED_PATHS
    for f in stored["files"]:  # bytes and sha256 checked against hashlib / stat, independently
        assert f["bytes"] == src[f["path"]].stat().st_size
        assert f["sha256"] == _sha(src[f["path"]])
    assert stored["source"] == {"repo": "google/gemma-3-270m", "revision": "main", "commit": "abc123",
                                "checkpoint_sha256": "0" * 64}  # fmt: skip
    assert stored["profile_hash"] == "1" * 64 and stored["gate_config_hash"] == "2" * 64
    assert stored["package_version"] == cellm.__version__
    assert stored["metrics"] == {"kl_mean": 0.0123, "top1_agreement": 0.981, "ppl_ratio": 1.004}
    assert stored["verdict"] == PASSING
    created = dt.datetime.strptime(stored["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert before <= created <= after
    assert stored["force_unsafe"] == {"forced": False, "reason": None, "user": None}


def test_layout_is_content_addressed_and_deduplicated(reg, spec, tmp_path):
    reg.publish(spec, PASSING)
    root = reg.backend.root
    blobs = sorted((root / "blobs/sha256").iterdir())
    for b in blobs:
        assert hashlib.sha256(b.read_bytes()).hexdigest() == b.name
    n = len(blobs)
    # a second version sharing every file but the .cellm adds exactly one blob
    other = tmp_path / "other.cellm"
    other.write_bytes(b"different weights")
    reg.publish(dataclasses.replace(spec, version="0.2.0", cellm_file=other), PASSING)
    assert len(list((root / "blobs/sha256").iterdir())) == n + 1
    assert reg.list_versions("tiny-gemma") == ["0.1.0", "0.2.0"]
    assert not list((root / "tmp").iterdir())  # no temp leftovers


def test_pull_roundtrip_identical_bytes(reg, spec, tmp_path):
    reg.publish(spec, PASSING)
    res = reg.pull("tiny-gemma:0.1.0", tmp_path / "out")
    out = tmp_path / "out"
    for rel, p in _source_files(spec).items():
        assert (out / rel).read_bytes() == p.read_bytes()
    assert (out / "manifest.json").read_bytes() == (
        reg.backend.root / "names/tiny-gemma/versions/0.1.0/manifest.json"
    ).read_bytes()
    assert sorted(res.fetched) == sorted(EXPECTED_PATHS) and res.reused == ()
    assert verify_dir(out).version == "0.1.0"
    assert not (tmp_path / ".out.partial").exists()
    # an existing empty directory is fine too
    (tmp_path / "empty").mkdir()
    reg.pull("tiny-gemma", tmp_path / "empty")
    assert verify_dir(tmp_path / "empty").name == "tiny-gemma"


def test_from_cellm_finds_sidecars(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "m.cellm").write_bytes(b"x" * 10)
    (d / "m.tokenizer.json").write_text("{}")
    (d / "m.NOTICE").write_text("terms")
    spec = BundleSpec.from_cellm(d / "m.cellm", "m", "1.0.0", metrics={"kl": 0.1})
    assert [r for r, _, _ in spec.collect()] == ["m.NOTICE", "m.cellm", "m.tokenizer.json"]


# ---------------------------------------------------------------------- gates
@dataclasses.dataclass(frozen=True)
class _Verdict:  # the GateVerdict protocol: .passed, .gate_class, .checks, .to_dict()
    passed: bool
    gate_class: str = "int8"
    checks: tuple = ()

    def to_dict(self):
        return {"passed": self.passed, "gate_class": self.gate_class, "checks": list(self.checks)}


def test_publish_requires_a_passing_verdict(reg, spec):
    root = reg.backend.root
    for verdict in (None, FAILING, _Verdict(False), {"passed": "yes"}, {"passed": 1}):
        with pytest.raises(UnsafePublishError, match="refusing to publish tiny-gemma:0.1.0"):
            reg.publish(spec, verdict)
    assert reg.list_names() == [] and not (root / "names").exists()
    with pytest.raises(UnsafePublishError, match="kl_mean"):  # the failed check is named
        reg.publish(spec, FAILING)
    with pytest.raises(RegistryError, match="passed"):
        reg.publish(spec, {"gate_class": "int8"})
    m = reg.publish(spec, _Verdict(True))
    assert m.passed and not m.forced and m.verdict["gate_class"] == "int8"
    # spec.verdict is used when no verdict argument is given
    m2 = reg.publish(dataclasses.replace(spec, version="0.2.0", verdict=PASSING))
    assert m2.passed


def test_force_unsafe_needs_reason_and_is_recorded(reg, spec):
    for reason in (None, "", "   "):
        with pytest.raises(UnsafePublishError, match="reason"):
            reg.publish(spec, FAILING, force_unsafe=True, reason=reason)
    assert reg.list_versions("tiny-gemma") == []
    m = reg.publish(spec, FAILING, force_unsafe=True, reason="demo build for the hackathon")
    assert m.forced and not m.passed
    shown = reg.show("tiny-gemma:0.1.0")
    assert shown.force_unsafe["forced"] is True and shown.force_unsafe["reason"] == "demo build for the hackathon"
    assert any("FORCE-UNSAFE" in line and "hackathon" in line for line in shown.summary_lines())
    assert shown.verdict == FAILING  # the failing verdict is kept, not hidden


# ---------------------------------------------------------------------- immutability + channels
def test_publish_over_existing_version_changes_nothing(reg, spec, tmp_path):
    reg.publish(spec, PASSING, channels=("latest", "stable"))
    snap = _snapshot(reg.backend.root)
    other = tmp_path / "evil.cellm"
    other.write_bytes(b"replacement")
    with pytest.raises(VersionExistsError, match="tiny-gemma:0.1.0 already exists"):
        reg.publish(dataclasses.replace(spec, cellm_file=other), PASSING)
    with pytest.raises(VersionExistsError):
        reg.publish(spec, PASSING, force_unsafe=True, reason="try anyway")
    assert _snapshot(reg.backend.root) == snap


def test_channels_move_and_resolve(reg, spec, tmp_path):
    reg.publish(spec, PASSING, channels=("latest", "stable"))
    other = tmp_path / "v2.cellm"
    other.write_bytes(b"v2 weights")
    reg.publish(dataclasses.replace(spec, version="0.2.0", cellm_file=other), PASSING)
    assert reg.list_channels("tiny-gemma") == {"latest": "0.2.0", "stable": "0.1.0"}
    assert reg.resolve("tiny-gemma") == ("tiny-gemma", "0.2.0")
    assert reg.resolve("tiny-gemma@stable") == ("tiny-gemma", "0.1.0")
    reg.pull("tiny-gemma@stable", tmp_path / "stable")
    assert (tmp_path / "stable/model.cellm").read_bytes() == spec.cellm_file.read_bytes()
    reg.set_channel("tiny-gemma", "stable", "0.2.0")
    assert reg.show("tiny-gemma@stable").version == "0.2.0"
    log = (reg.backend.root / "names/tiny-gemma/channels/stable.log").read_text().splitlines()
    assert [json.loads(line)["version"] for line in log] == ["0.1.0", "0.2.0"]
    with pytest.raises(RegistryNotFound, match="no such version"):
        reg.set_channel("tiny-gemma", "stable", "9.9.9")
    assert reg.show("tiny-gemma@stable").version == "0.2.0"
    with pytest.raises(InvalidNameError):
        reg.set_channel("tiny-gemma", "v2", "0.2.0")


def test_no_channel_publish(reg, spec):
    reg.publish(spec, PASSING, channels=())
    assert reg.list_channels("tiny-gemma") == {}
    with pytest.raises(RegistryNotFound, match="channels of tiny-gemma: {}"):
        reg.resolve("tiny-gemma")


# ---------------------------------------------------------------------- bad input
def test_unknown_version_and_channel_list_what_exists(reg, spec, tmp_path):
    reg.publish(spec, PASSING)
    with pytest.raises(RegistryNotFound) as ei:
        reg.pull("tiny-gemma:9.9.9", tmp_path / "out")
    assert "9.9.9" in str(ei.value) and "['0.1.0']" in str(ei.value)
    assert isinstance(ei.value, LookupError)
    with pytest.raises(RegistryNotFound, match=r"channels of tiny-gemma: \{'latest': '0.1.0'\}"):
        reg.show("tiny-gemma@stable")
    with pytest.raises(RegistryNotFound, match=r"names: \['tiny-gemma'\]"):
        reg.show("nope")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "x/../../etc"])
def test_bad_names_rejected_everywhere(reg, tmp_path, bad):
    with pytest.raises(InvalidNameError, match="path separators"):
        make_spec(tmp_path / "src", name=bad)
    with pytest.raises(InvalidNameError):
        make_spec(tmp_path / "src", version=bad)
    with pytest.raises(InvalidNameError):
        reg.pull(f"{bad}:1.0", tmp_path / "out")
    with pytest.raises(InvalidNameError):
        reg.list_versions(bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def _flip_byte(p: Path, offset: int = 100) -> None:
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[offset % len(data)] ^= 0xFF
    p.write_bytes(bytes(data))


def test_tampered_blob_fails_loudly_and_leaves_nothing(reg, spec, tmp_path):
    m = reg.publish(spec, PASSING)
    entry = m.file("model.cellm")
    blob = reg.backend.root / "blobs/sha256" / entry.sha256
    _flip_byte(blob)
    actual = hashlib.sha256(blob.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError) as ei:
        reg.pull("tiny-gemma:0.1.0", tmp_path / "out")
    msg = str(ei.value)
    assert "model.cellm" in msg and entry.sha256 in msg and actual in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    # the registry's other versions / files are untouched; the manifest still names the good digest
    assert reg.show("tiny-gemma:0.1.0").file("model.cellm").sha256 == entry.sha256


def test_missing_blob(reg, spec, tmp_path):
    m = reg.publish(spec, PASSING)
    (reg.backend.root / "blobs/sha256" / m.file("model.NOTICE").sha256).unlink()
    with pytest.raises(IntegrityError, match="model.NOTICE.*missing|missing.*model.NOTICE"):
        reg.pull("tiny-gemma:0.1.0", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_manifest(reg, spec, tmp_path):
    reg.publish(spec, PASSING)
    (reg.backend.root / "names/tiny-gemma/versions/0.1.0/manifest.json").unlink()
    assert reg.list_versions("tiny-gemma") == []
    with pytest.raises(RegistryNotFound, match="0.1.0"):
        reg.pull("tiny-gemma:0.1.0", tmp_path / "out")
    with pytest.raises(RegistryNotFound, match="points to 0.1.0, whose manifest is missing"):
        reg.pull("tiny-gemma@latest", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"schema": "cellm.registry.manifest/v1", "name": "tiny-gemma"}', "missing required keys"),
        ("files-traversal", "unsafe or reserved file path '../../escape'"),
        ("files-badsha", "invalid sha256"),
        ("wrong-name", "describes other:0.1.0"),
    ],
)
def test_malformed_manifest_is_a_clear_error(reg, spec, tmp_path, content, match):
    m = reg.publish(spec, PASSING)
    mpath = reg.backend.root / "names/tiny-gemma/versions/0.1.0/manifest.json"
    d = m.to_dict()
    if content == "files-traversal":
        d["files"][0]["path"] = "../../escape"
        content = json.dumps(d).encode()
    elif content == "files-badsha":
        d["files"][0]["sha256"] = "xyz"
        content = json.dumps(d).encode()
    elif content == "wrong-name":
        d["name"] = "other"
        content = json.dumps(d).encode()
    os.chmod(mpath, 0o644)
    mpath.write_bytes(content)
    with pytest.raises(ManifestError, match=match):
        reg.pull("tiny-gemma:0.1.0", tmp_path / "out")
    with pytest.raises(ManifestError):
        reg.show("tiny-gemma:0.1.0")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape").exists()
    # via the channel the edit is caught as a manifest changed after publication
    with pytest.raises(IntegrityError, match="changed after it was published"):
        reg.show("tiny-gemma@latest")


def test_pull_refuses_non_empty_output(reg, spec, tmp_path):
    reg.publish(spec, PASSING)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="not an empty directory"):
        reg.pull("tiny-gemma", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_bundle_spec_errors(tmp_path, spec):
    with pytest.raises(RegistryError, match="does not exist"):
        dataclasses.replace(spec, notice=tmp_path / "missing").collect()
    with pytest.raises(RegistryError, match=".cellm"):
        dataclasses.replace(spec, cellm_file=spec.notice).collect()
    dup = tmp_path / "x" / "model.cellm"
    dup.parent.mkdir()
    dup.write_bytes(b"dup")
    with pytest.raises(RegistryError, match="same path"):
        dataclasses.replace(spec, extra_files=(dup,)).collect()


# ---------------------------------------------------------------------- URLs
def test_default_registry_is_artifacts_in_cwd(tmp_path, monkeypatch, spec):
    monkeypatch.delenv("CELLM_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    reg = open_registry()
    assert reg.url == "file://artifacts"
    reg.publish(spec, PASSING)
    assert (tmp_path / "artifacts/names/tiny-gemma/versions/0.1.0/manifest.json").is_file()
    monkeypatch.setenv("CELLM_REGISTRY", f"file://{tmp_path / 'elsewhere'}")
    assert open_registry().list_names() == []
    assert open_registry(tmp_path / "artifacts").list_names() == ["tiny-gemma"]  # bare path
    with pytest.raises(RegistryError, match="unsupported registry URL"):
        open_registry("s3://bucket/x")
