import pytest

from cellm.atomic import atomic_write, write_json


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


def test_write_json_sorted_and_all_or_nothing(tmp_path):
    p = tmp_path / "r.json"
    write_json(p, {"b": 1, "a": [1, 2]}, indent=1, newline=True)
    assert p.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    with pytest.raises(TypeError):  # not serializable, half-way through the dump
        write_json(p, {"a": 1, "z": object()})
    assert p.read_text().startswith('{\n "a"') and [x.name for x in tmp_path.iterdir()] == ["r.json"]
    write_json(p, {"t": object()}, default=lambda o: "obj")
    assert p.read_text() == '{\n  "t": "obj"\n}'
