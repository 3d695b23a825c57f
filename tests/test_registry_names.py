"""Artifact names, versions, channels and references: allowed patterns and clear rejections."""

from __future__ import annotations

import os.path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.errors import InvalidNameError, ManifestError, RegistryError
from cellm.registry.manifest import check_relpath
from cellm.registry.names import (
    NAME_PATTERN,
    Ref,
    parse_ref,
    validate_channel,
    validate_name,
    validate_version,
    version_sort_key,
)


@pytest.mark.parametrize("name", ["gemma-3-270m-int8", "a", "0abc", "x.y_z-1", "a" * 128])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "a\\b", "..", ".", "a..b", "", "-x", "_x", "Upper", "a b", "a" * 129, "/abs"]
)
def test_bad_names_raise_with_pattern(name):
    with pytest.raises(InvalidNameError) as ei:
        validate_name(name)
    assert isinstance(ei.value, (RegistryError, ValueError))
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert repr(name) in msg and NAME_PATTERN in msg


@pytest.mark.parametrize("v", ["0.1.0", "2026.11.28-1", "0.1.0+abc", "v1.2.3", "1", "1.0.0-rc1"])
def test_good_versions(v):
    assert validate_version(v) == v


@pytest.mark.parametrize("v", ["latest", "../1.0", "1.0/x", "1..0", "", "1_0", "V1", "-1", "1.0 "])
def test_bad_versions(v):
    with pytest.raises(InvalidNameError, match="version"):
        validate_version(v)


@pytest.mark.parametrize("c", ["latest", "stable", "canary-eu"])
def test_good_channels(c):
    assert validate_channel(c) == c


@pytest.mark.parametrize("c", ["v1", "1.0", "../x", "Stable", "a_b", ""])
def test_bad_channels(c):
    with pytest.raises(InvalidNameError, match="channel"):
        validate_channel(c)


def test_parse_ref_forms():
    assert parse_ref("m") == Ref("m", channel="latest")
    assert parse_ref("m:0.1.0+abc") == Ref("m", version="0.1.0+abc")
    assert parse_ref("m@stable") == Ref("m", channel="stable")
    assert str(parse_ref("m:1.0")) == "m:1.0" and str(parse_ref("m@stable")) == "m@stable"
    for bad in ("m:1.0@stable", "../m:1.0", "m:", "m@", "m:../../etc"):
        with pytest.raises(InvalidNameError):
            parse_ref(bad)


def test_version_natural_order():
    vs = ["0.10.0", "0.9.0", "0.9.1", "2026.11.28-1", "2026.2.1-1", "1.0.0"]
    assert sorted(vs, key=version_sort_key) == ["0.9.0", "0.9.1", "0.10.0", "1.0.0", "2026.2.1-1", "2026.11.28-1"]


# ---------------------------------------------------------------------- manifest paths (hypothesis)

_parts = st.sampled_from(["a", "b.onnx", "..", ".", "", "x..y", "c\\d", "e.part", "manifest.json", "~"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_parts, min_size=1, max_size=5), st.booleans())
def test_accepted_manifest_paths_never_escape_the_bundle(parts, absolute):
    path = ("/" if absolute else "") + "/".join(parts)
    root = "/bundle/root"
    try:
        rel = check_relpath(path)
    except ManifestError:
        return
    resolved = os.path.normpath(os.path.join(root, rel))
    assert resolved.startswith(root + "/") and resolved != root
    assert ".." not in rel.split("/") and not rel.startswith("/") and "\\" not in rel
    assert rel != "manifest.json" and not rel.endswith(".part")
