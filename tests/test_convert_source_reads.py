"""Source tensor reads (safetensors_io.read_rows): mapped windows and pread give the same values as
the safetensors library; arrays are private (writable, the file never changes); a file that shrank
after its header was checked is a SourceError, not a crash."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cellm.errors import SourceError
from cellm.sources import safetensors_io as sio


@pytest.fixture(scope="module")
def st_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    t = {
        "a": torch.from_numpy(rng.standard_normal((700, 520)).astype(np.float32)),  # 1.4 MB: mapped
        "b": torch.from_numpy(rng.standard_normal((1100, 500)).astype(np.float32)).to(torch.bfloat16),
        "c": torch.from_numpy(rng.standard_normal((1030, 600)).astype(np.float16)),
        "small": torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)),
    }
    p = tmp_path_factory.mktemp("st") / "m.safetensors"
    save_file(t, str(p))
    return p, {k: v.float().numpy() for k, v in t.items()}


@pytest.mark.parametrize("min_bytes", [1 << 20, 1 << 62])  # mapped windows / pread only
@pytest.mark.parametrize("name", ["a", "b", "c", "small"])
@pytest.mark.parametrize("rows", [None, slice(0, 1), slice(3, 517), slice(699, 2000)])
def test_read_rows_matches_safetensors(st_file, monkeypatch, min_bytes, name, rows):
    path, ref = st_file
    monkeypatch.setattr(sio, "MMAP_MIN_BYTES", min_bytes)
    entries, _ = sio.read_header(path)
    got = sio.read_rows(entries[name], rows)
    want = ref[name] if rows is None else ref[name][rows]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_mapped_arrays_are_private_copies(st_file):
    path, ref = st_file
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    entries, _ = sio.read_header(path)
    a = sio.read_rows(entries["a"])
    assert a.flags.writeable
    a[:] = 0  # copy-on-write: the file and later reads are untouched
    np.testing.assert_array_equal(sio.read_rows(entries["a"]), ref["a"])
    del a
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_file_shrunk_after_header_check_is_a_source_error(st_file, tmp_path):
    path, _ = st_file
    p = tmp_path / "cut.safetensors"
    p.write_bytes(path.read_bytes())
    entries, _ = sio.read_header(p)
    with open(p, "r+b") as f:
        f.truncate(entries["c"].offset + 100)
    with pytest.raises(SourceError, match="unexpected end of file reading 'c'"):
        sio.read_rows(entries["c"])
