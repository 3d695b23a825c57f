"""Minimal safetensors I/O with windowed reads (no long-lived mmap) and a streaming writer.

Layout: u64 LE header length N, N bytes of JSON ({name: {dtype, shape, data_offsets: [begin, end]},
optional "__metadata__"}), then the data; offsets are relative to the end of the header.
``read_rows`` reads only the requested rows: big reads map just that window of the file (private,
copy-on-write, so the array is writable and the file is never modified) and F32 data is handed out
as a view of the mapping, which is unmapped when the last array using it goes away — no copy, no
fresh pages to fault in; small reads (and files that cannot be mapped) use ``os.pread``. Nothing
stays mapped beyond the arrays' lifetime, so peak RSS is bounded by what the caller holds.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from pathlib import Path
import numpy as np

from cellm.errors import SourceError

MAX_HEADER = 100 * 1024 * 1024
# Reads of at least this many bytes map the window instead of copying it (see ``read_rows``).
MMAP_MIN_BYTES = 1 << 20
WIDTH = {"F32": 4, "F16": 2, "BF16": 2}


@dataclasses.dataclass(frozen=True)
class StEntry:
    """One tensor of a safetensors file: absolute byte offset in ``path``."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path, keep=None) -> tuple[dict[str, StEntry], dict]:
    """Parse and bounds-check a safetensors header; returns (entries by stored name, metadata).

    ``keep(name) -> bool`` selects the entries to check and return (default: all).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SourceError(f"{path}: truncated safetensors file ({size} bytes < 8)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise SourceError(
                    f"{path}: safetensors header length {n} exceeds the file ({size} bytes) "
                    f"or the limit {MAX_HEADER}"
                )
            raw = f.read(n)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, StEntry] = {}
    for name, info in header.items():
        if keep is not None and not keep(name):
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: bad safetensors entry for {name!r}: {info!r}") from exc
        if dtype not in WIDTH:
            raise SourceError(
                f"{path}: tensor {name!r} has dtype {dtype!r}; supported: {', '.join(WIDTH)}"
            )
        want = int(np.prod(shape, dtype=np.int64)) * WIDTH[dtype] if shape else WIDTH[dtype]
        if min(shape, default=0) < 0 or end - begin != want or begin < 0 or base + end > size:
            raise SourceError(
                f"{path}: tensor {name!r} offsets [{begin}, {end}) do not fit dtype {dtype} shape "
                f"{list(shape)} ({want} bytes) inside the file ({size} bytes)"
            )
        out[name] = StEntry(name, path, dtype, shape, base + begin, end - begin)
    return out, meta


def _pread(entry: StEntry, pos: int, nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            view = memoryview(raw)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], pos + done)
                if got <= 0:
                    raise SourceError(f"{entry.path}: unexpected end of file reading {entry.name!r}")
                done += got
        finally:
            os.close(fd)
    return raw


def _map_window(entry: StEntry, pos: int, nbytes: int) -> np.ndarray | None:
    """Bytes ``[pos, pos + nbytes)`` of the file as a private copy-on-write mapping of just that
    window (None where the file cannot be mapped: the caller falls back to ``pread``)."""
    base = pos - pos % mmap.ALLOCATIONGRANULARITY
    try:
        fd = os.open(entry.path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"cannot read {entry.path}: {exc}") from exc
    try:
        size = os.fstat(fd).st_size
        if size < pos + nbytes:  # shrunk since the header was checked: mapping it would SIGBUS
            raise SourceError(f"{entry.path}: unexpected end of file reading {entry.name!r} "
                              f"(needs {pos + nbytes} bytes, file has {size})")
        try:
            mm = mmap.mmap(fd, pos + nbytes - base, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        except (OSError, ValueError):  # not mappable (some FUSE/network filesystems): pread
            return None
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=pos - base)


def read_rows(entry: StEntry, rows: slice | None = None) -> np.ndarray:
    """Read ``entry`` (or rows ``rows`` of its first axis) and convert to float32."""
    shape = entry.shape
    width = WIDTH[entry.dtype]
    if rows is None or not shape:
        start, stop, out_shape = 0, (shape[0] if shape else 1), shape
    else:
        start, stop, step = rows.indices(shape[0])
        if step != 1:
            raise SourceError(f"row slices must be contiguous (step 1), got step {step}")
        stop = max(stop, start)
        out_shape = (stop - start,) + shape[1:]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * width if shape else width
    nbytes = (stop - start) * row_bytes
    pos = entry.offset + start * row_bytes
    raw = _map_window(entry, pos, nbytes) if nbytes >= MMAP_MIN_BYTES else None
    if raw is None:
        raw = _pread(entry, pos, nbytes)
    if entry.dtype == "F32":
        return raw.view("<f4").astype(np.float32, copy=False).reshape(out_shape)
    if entry.dtype == "F16":
        return raw.view("<f2").astype(np.float32).reshape(out_shape)
    bits = raw.view("<u2").astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32).reshape(out_shape)


class StreamingWriter:
    """Write a safetensors file tensor by tensor (sorted by name), atomically (temp + fsync + rename).

    ``specs`` maps name -> (dtype, shape); call ``write(name, array)`` in sorted-name order,
    possibly in several row chunks per tensor (``write`` appends), then ``close()``.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        self.names = sorted(specs)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        off = 0
        self._sizes: dict[str, int] = {}
        self._dtypes: dict[str, str] = {}
        for n in self.names:
            dtype, shape = specs[n]
            nbytes = int(np.prod(shape, dtype=np.int64)) * WIDTH[dtype]
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            self._sizes[n] = nbytes
            self._dtypes[n] = dtype
            off += nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._idx = 0
        self._written = 0

    def write(self, name: str, array: np.ndarray) -> None:
        if self._idx >= len(self.names) or self.names[self._idx] != name:
            if self._idx + 1 < len(self.names) and self.names[self._idx + 1] == name and self._written == self._sizes[self.names[self._idx]]:
                self._idx += 1
                self._written = 0
            else:
                raise SourceError(f"safetensors writer: got {name!r} out of order")
        dtype = self._dtypes[name]
        a = np.ascontiguousarray(array, dtype=np.float32)
        if dtype == "F32":
            data = a.astype("<f4", copy=False).tobytes()
        elif dtype == "F16":
            data = a.astype("<f2").tobytes()
        else:
            u = a.view(np.uint32)
            data = (((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype("<u2")).tobytes()
        if self._written + len(data) > self._sizes[name]:
            raise SourceError(f"safetensors writer: too many bytes for {name!r}")
        self._f.write(data)
        self._written += len(data)

    def close(self) -> None:
        last = self.names[-1] if self.names else None
        if last is not None and (self._idx != len(self.names) - 1 or self._written != self._sizes[last]):
            self.abort()
            raise SourceError(f"safetensors writer closed early (at {self.names[self._idx]!r})")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    tmp = Path(path).with_name(Path(path).name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

