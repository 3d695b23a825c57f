"""Streaming `.cellm` v1 writer.

``CellmWriter(path, header, specs)`` sorts the specs by name, assigns absolute 64-byte aligned
offsets, fills ``header["tensors"]``, writes magic/version/header/padding to a temp file in the
target directory. Tensors are then written in sorted name order (``names``), either whole —
``write(name, data)`` — or in consecutive chunks (e.g. row chunks of a quantized tensor):

    with writer.tensor(name) as t:      # or: t = writer.tensor(name); ...; t.close()
        for chunk in chunks:
            t.write(chunk)              # the chunks must add up to the spec's nbytes
    writer.write_tensor_chunks(name, chunks)   # the same, from an iterable

so only one chunk is held at a time. ``close()`` checks every tensor was written, fsyncs and renames
the temp file into place; ``abort()`` (or an exception inside ``with``) removes the temp file.
With ``digest=True`` the writer hashes every byte as it writes it (``sha256``, no re-read), and
``nbytes`` is the file size so far. Written data is handed to the kernel's writeback in the
background every ``sync_every`` bytes, so the final fsync has little left to wait for.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cellm.errors import FormatError
from cellm.format.constants import (
    ALIGNMENT,
    DTYPES,
    MAGIC,
    MAX_HEADER_LEN,
    PREFIX_LEN,
    REQUIRED_HEADER_KEYS,
    UPSTREAM_OPTIONAL_KEYS,
    VERSION,
    TensorSpec,
    align_up,
    make_spec,
    tensor_nbytes,
)

_ZEROS = bytes(ALIGNMENT)
SYNC_EVERY = 16 << 20  # default: start writeback of every 16 MiB written (see CellmWriter)


def check_required_keys(header: Mapping[str, Any], where: str = "header") -> None:
    """Upstream parses the header into a typed struct: required keys must be present and every
    upstream key (required or optional) must have the JSON type upstream expects, or it fails."""
    if not isinstance(header, Mapping):
        raise FormatError(f"{where} must be a JSON object, got {type(header).__name__}")
    for key, types in REQUIRED_HEADER_KEYS.items():
        if key == "tensors":
            continue
        if key not in header:
            raise FormatError(f"{where} is missing required key {key!r}")
        v = header[key]
        if isinstance(v, bool) or not isinstance(v, types):
            raise FormatError(
                f"{where} key {key!r}={v!r} must be {' or '.join(t.__name__ for t in types)}"
            )
        if isinstance(v, int) and types == (int,) and v < 0:
            raise FormatError(f"{where} key {key!r}={v!r} must be >= 0")
    for key, kind in UPSTREAM_OPTIONAL_KEYS.items():
        v = header.get(key)
        if v is None:
            continue
        ok = {
            "str": isinstance(v, str),
            "usize": isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
            "u32": isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
            "bool": isinstance(v, bool),
            "list[str]": isinstance(v, list) and all(isinstance(x, str) for x in v),
            "any": True,
        }[kind]
        if not ok:
            raise FormatError(f"{where} key {key!r}={v!r} must be {kind} (or null) for upstream readers")


def plan_layout(header: Mapping[str, Any], specs: list[TensorSpec]) -> tuple[bytes, list[dict[str, Any]]]:
    """Header JSON bytes (with ``tensors`` filled) and the sorted tensor entries with offsets."""
    check_required_keys(header)
    seen: set[str] = set()
    for s in specs:
        if not isinstance(s.name, str) or not s.name:
            raise FormatError(f"tensor name {s.name!r} must be a non-empty string")
        if s.name in seen:
            raise FormatError(f"duplicate tensor name {s.name!r}")
        seen.add(s.name)
        expected = tensor_nbytes(s.dtype, s.shape, s.name)
        if expected != s.nbytes:
            raise FormatError(
                f"tensor {s.name!r}: nbytes {s.nbytes} does not match dtype {s.dtype} shape "
                f"{list(s.shape)} (expected {expected})"
            )
    ordered = sorted(specs, key=lambda s: s.name)
    hdr = {k: v for k, v in header.items() if k not in ("tensors", "cellm_extensions")}
    used = sorted({s.dtype for s in specs if DTYPES[s.dtype].is_extension})
    if used:  # extension files declare what they use; pure v1 files carry no such key
        hdr["cellm_extensions"] = used

    def encode(entries: list[dict[str, Any]]) -> bytes:
        d = dict(hdr)
        d["tensors"] = entries
        try:
            return json.dumps(d, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise FormatError(f"header is not JSON serialisable: {exc}") from exc

    # Offsets depend on the header length, which depends on the offsets: iterate to a fixed point.
    data_start = 0
    while True:
        entries, off = [], data_start
        for s in ordered:
            off = align_up(off)
            entries.append({"name": s.name, "dtype": s.dtype, "shape": [int(x) for x in s.shape],
                            "offset_bytes": off, "nbytes": int(s.nbytes)})
            off += s.nbytes
        blob = encode(entries)
        start = align_up(PREFIX_LEN + len(blob))
        if start == data_start:
            break
        data_start = start
    if len(blob) > MAX_HEADER_LEN:
        raise FormatError(f"header is {len(blob)} bytes, limit {MAX_HEADER_LEN}")
    return blob, entries


class TensorSink:
    """The open tensor of a :class:`CellmWriter`: ``write(chunk)`` appends consecutive bytes of it;
    ``close()`` (or leaving the ``with`` block) checks they add up to the spec's nbytes."""

    def __init__(self, writer: "CellmWriter", entry: dict[str, Any]):
        self._w = writer
        self.entry = entry
        self.written = 0
        self.closed = False

    @property
    def name(self) -> str:
        return self.entry["name"]

    def write(self, data: np.ndarray | bytes | bytearray | memoryview) -> None:
        if self.closed or self._w._closed:
            raise FormatError(f"tensor {self.name!r}: write after its last piece or on a closed writer")
        buf = self._w._bytes_of(self.entry, data)
        if self.written + buf.nbytes > self.entry["nbytes"]:
            raise FormatError(
                f"tensor {self.name!r} ({self.entry['dtype']} {self.entry['shape']}): pieces total "
                f"{self.written + buf.nbytes} bytes, expected {self.entry['nbytes']}"
            )
        self._w._emit(buf)
        self.written += buf.nbytes

    def close(self) -> None:
        if self.closed:
            return
        if self.written != self.entry["nbytes"]:
            raise FormatError(
                f"tensor {self.name!r} ({self.entry['dtype']} {self.entry['shape']}): pieces total "
                f"{self.written} bytes, expected {self.entry['nbytes']}"
            )
        self.closed = True
        self._w._finish(self)

    def __enter__(self) -> "TensorSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class CellmWriter:
    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any], specs: list[TensorSpec], *,
                 digest: bool = False, sync_every: int | None = SYNC_EVERY):
        self.path = Path(path)
        blob, self.entries = plan_layout(header, list(specs))
        self.header = json.loads(blob)
        self._next = 0
        self._pos = 0
        self._open: TensorSink | None = None  # the tensor being written in pieces
        self._closed = False
        self._sha = hashlib.sha256() if digest else None
        self._sync_every = sync_every
        self._synced_at = 0
        self._sync_thread: threading.Thread | None = None
        # Temp file next to the target (same filesystem for the atomic rename), created with mode
        # 0o666 so the umask applies as for any normal file (mkstemp would leave it 0o600).
        self._tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        self._f = os.fdopen(fd, "wb")
        try:
            self._emit(MAGIC + struct.pack("<BI", VERSION, len(blob)) + blob)
            self._pad_to(align_up(self._pos))
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ internals
    def _emit(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        if self._sha is not None:
            self._sha.update(data)
        self._pos += len(data)
        if self._sync_every and self._pos - self._synced_at >= self._sync_every:
            self._background_sync()

    def _background_sync(self) -> None:
        """Start writeback of what was written so far (fdatasync in a thread; at most one at a
        time) so that close()'s fsync overlaps the rest of the conversion instead of following it."""
        if self._sync_thread is not None and self._sync_thread.is_alive():
            return
        self._f.flush()
        self._synced_at = self._pos
        fd = self._f.fileno()

        def sync() -> None:
            try:
                os.fdatasync(fd)
            except OSError:
                pass  # close() fsyncs again and reports errors there

        self._sync_thread = threading.Thread(target=sync, name="cellm-writeback", daemon=True)
        self._sync_thread.start()

    def _join_sync(self) -> None:
        if self._sync_thread is not None:
            self._sync_thread.join()
            self._sync_thread = None

    def _pad_to(self, target: int) -> None:
        while self._pos < target:
            self._emit(_ZEROS[: min(ALIGNMENT, target - self._pos)])

    def _finish(self, sink: TensorSink) -> None:
        self._open = None
        self._next += 1

    @staticmethod
    def _bytes_of(entry: dict[str, Any], data: Any) -> memoryview:
        if isinstance(data, np.ndarray):
            storage = DTYPES[entry["dtype"]].storage
            if data.dtype != storage and data.dtype != np.uint8:
                raise FormatError(
                    f"tensor {entry['name']!r} (dtype {entry['dtype']}): got a {data.dtype} array, "
                    f"expected {storage} storage (or raw uint8 bytes)"
                )
            return memoryview(np.ascontiguousarray(data)).cast("B")
        try:
            return memoryview(data).cast("B")
        except TypeError as exc:
            raise FormatError(f"tensor {entry['name']!r}: data of type {type(data).__name__} is not bytes-like") from exc

    # ------------------------------------------------------------------ API
    @property
    def names(self) -> list[str]:
        """Tensor names in the order ``write``/``tensor`` expect them."""
        return [e["name"] for e in self.entries]

    @property
    def nbytes(self) -> int:
        """Bytes written so far (the file size once closed)."""
        return self._pos

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far (the file's, once closed); needs ``digest=True``."""
        if self._sha is None:
            raise FormatError("sha256 needs CellmWriter(..., digest=True)")
        return self._sha.hexdigest()

    def _begin(self, name: str, what: str) -> dict[str, Any]:
        """The entry of ``name`` if it is the next tensor to write (``what`` names the call)."""
        if self._closed:
            raise FormatError(f"{what} on a closed writer")
        if self._open is not None:
            raise FormatError(f"{what} while tensor {self._open.name!r} is being written in pieces")
        if self._next >= len(self.entries):
            raise FormatError(f"{what}: all {len(self.entries)} tensors were already written")
        entry = self.entries[self._next]
        if name != entry["name"]:
            raise FormatError(f"{what} out of order: expected tensor {entry['name']!r} next")
        return entry

    def _open_sink(self, entry: dict[str, Any]) -> TensorSink:
        self._pad_to(entry["offset_bytes"])
        self._open = TensorSink(self, entry)
        return self._open

    def tensor(self, name: str) -> TensorSink:
        """Open the next tensor (``name`` must be next in sorted order) for chunked writing."""
        return self._open_sink(self._begin(name, f"tensor({name!r})"))

    def write_tensor_chunks(self, name: str, chunks: Iterable[Any]) -> None:
        """Write the next tensor from consecutive chunks (they must add up to its nbytes)."""
        with self.tensor(name) as t:
            for c in chunks:
                t.write(c)

    def write(self, name: str, data: np.ndarray | bytes | bytearray | memoryview) -> None:
        """Write the whole next tensor at once (checked before anything is written)."""
        entry = self._begin(name, f"write({name!r})")
        buf = self._bytes_of(entry, data)
        if buf.nbytes != entry["nbytes"]:
            raise FormatError(
                f"tensor {name!r} ({entry['dtype']} {entry['shape']}): got {buf.nbytes} bytes, "
                f"expected {entry['nbytes']}"
            )
        with self._open_sink(entry) as t:
            t.write(buf)

    def write_part(self, name: str, data: np.ndarray | bytes | bytearray | memoryview, *,
                   first: bool, last: bool) -> None:
        """Write the next tensor in consecutive pieces (e.g. row chunks of a quantized tensor):
        ``first`` marks its first piece, ``last`` its final one; the pieces must add up to nbytes.
        (The flag form of ``tensor(name)`` / ``TensorSink.write`` / ``TensorSink.close``.)"""
        what = f"write_part({name!r})"
        if first:
            sink = self._open_sink(self._begin(name, what))
        else:
            sink = self._open
            if sink is None:
                if not self._closed and self._next < len(self.entries) and self.entries[self._next]["name"] == name:
                    raise FormatError(f"{what}: its first piece was not marked first=True")
                self._begin(name, what)  # raises the out-of-order / closed error
            elif sink.name != name:
                raise FormatError(f"{what} while tensor {sink.name!r} is being written in pieces")
        sink.write(data)
        if last:
            sink.close()

    def close(self) -> Path:
        """Finish: every tensor must have been written; fsync + atomic rename. Returns the path."""
        if self._closed:
            return self.path
        if self._next != len(self.entries) or self._open is not None:
            missing = self.entries[self._next]["name"]
            self.abort()
            raise FormatError(
                f"close(): {len(self.entries) - self._next} tensor(s) not written, next {missing!r}"
            )
        try:
            self._f.flush()
            self._join_sync()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.path)
            try:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop the partial file (idempotent)."""
        self._closed = True
        self._join_sync()
        try:
            self._f.close()
        except Exception:
            pass
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "CellmWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_cellm(path: str | os.PathLike, header: Mapping[str, Any],
                arrays: Mapping[str, tuple[str, tuple[int, ...], np.ndarray | bytes]]) -> Path:
    """Write a whole file at once: ``arrays[name] = (dtype, logical shape, storage data)``."""
    specs = [make_spec(n, dt, shp) for n, (dt, shp, _) in arrays.items()]
    with CellmWriter(path, header, specs) as w:
        for n in w.names:
            w.write(n, arrays[n][2])
    return Path(path)


def header_from_config(cfg: Any, raw_hf_config: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Upstream header keys from a ``GemmaTextConfig`` (+ the raw HF config dict), then ``extra``.

    ``rope_theta`` is the GLOBAL (full-attention) base, 1e6 for Gemma-3, whatever the config style.
    ``source_text_config`` is the HF text config (the ``text_config`` of a multimodal config).
    """
    raw = dict(raw_hf_config) if raw_hf_config is not None else cfg.to_hf_dict(5)
    text = dict(raw.get("text_config") if isinstance(raw.get("text_config"), Mapping) else raw)
    # A multimodal wrapper's text_config may omit model_type and keys left at their defaults: fill
    # them from the parsed config (same config style; the source's own keys win), so readers can
    # rebuild exactly ``cfg`` from source_text_config alone.
    style = 5 if isinstance(text.get("rope_parameters"), Mapping) else 4
    for k, v in cfg.to_hf_dict(style).items():
        if k == "architectures" and "text_config" in raw:
            continue
        text.setdefault(k, v)
    h: dict[str, Any] = {
        "model_type": "gemma3_text",
        "vocab_size": int(cfg.vocab_size),
        "hidden_dim": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": int(cfg.num_attention_heads),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": int(cfg.head_dim),
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "rope_theta": float(cfg.rope_global.theta),
        "bos_token_id": int(cfg.bos_token_id),
        # upstream parses eos_token_id as Option<u32>: one id (the full list is in source_text_config)
        "eos_token_id": int(cfg.eos_token_ids[0]),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "source_model_type": str(raw.get("model_type", "gemma3_text")),
        "source_architectures": list(raw.get("architectures") or ["Gemma3ForCausalLM"]),
        "source_text_config": dict(text),
    }
    if raw.get("torch_dtype") or raw.get("dtype"):
        h["source_torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype"))
    for k, v in extra.items():
        h[k] = v
    h["tensors"] = []
    return h


__all__ = ["CellmWriter", "TensorSink", "write_cellm", "header_from_config", "plan_layout", "check_required_keys"]
