import pytest

from cellm.atomic import atomic_write


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write(p, lambda f: f.write("old"), binary=False)
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_failure_leaves_target_and_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"keep")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_bytes() == b"keep"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]
