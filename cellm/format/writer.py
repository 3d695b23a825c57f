"""Streaming `.cellm` v1 writer.

``CellmWriter(path, header, specs)`` sorts the specs by name, assigns absolute 64-byte aligned
offsets, fills ``header["tensors"]``, writes magic/version/header/padding to a temp file in the
target directory; ``write(name, data)`` must then be called once per tensor in sorted name order
(only one tensor is held at a time); ``close()`` checks every tensor was written, fsyncs and renames
the temp file into place. ``abort()`` (or an exception inside ``with``) removes the temp file.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any, Mapping

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


class CellmWriter:
    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any], specs: list[TensorSpec]):
        self.path = Path(path)
        blob, self.entries = plan_layout(header, list(specs))
        self.header = json.loads(blob)
        self._next = 0
        self._pos = 0
        self._piece_bytes: int | None = None  # bytes of the tensor being written in pieces
        self._closed = False
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
        self._pos += len(data)

    def _pad_to(self, target: int) -> None:
        while self._pos < target:
            self._emit(_ZEROS[: min(ALIGNMENT, target - self._pos)])

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
        """Tensor names in the order ``write`` expects them."""
        return [e["name"] for e in self.entries]

    def write(self, name: str, data: np.ndarray | bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise FormatError(f"write({name!r}) on a closed writer")
        if self._next >= len(self.entries):
            raise FormatError(f"write({name!r}): all {len(self.entries)} tensors were already written")
        if self._piece_bytes is not None:
            raise FormatError(f"write({name!r}) while tensor {self.entries[self._next]['name']!r} is "
                              f"being written in pieces")
        entry = self.entries[self._next]
        if name != entry["name"]:
            raise FormatError(f"write({name!r}) out of order: expected tensor {entry['name']!r} next")
        buf = self._bytes_of(entry, data)
        if buf.nbytes != entry["nbytes"]:
            raise FormatError(
                f"tensor {name!r} ({entry['dtype']} {entry['shape']}): got {buf.nbytes} bytes, "
                f"expected {entry['nbytes']}"
            )
        self._pad_to(entry["offset_bytes"])
        self._emit(buf)
        self._next += 1

    def write_part(self, name: str, data: np.ndarray | bytes | bytearray | memoryview, *,
                   first: bool, last: bool) -> None:
        """Write the next tensor in consecutive pieces (e.g. row chunks of a quantized tensor):
        ``first`` marks its first piece, ``last`` its final one; the pieces must add up to nbytes."""
        if first and last:
            self.write(name, data)
            return
        if self._closed or self._next >= len(self.entries):
            raise FormatError(f"write_part({name!r}) with no tensor left to write")
        entry = self.entries[self._next]
        if name != entry["name"]:
            raise FormatError(f"write_part({name!r}) out of order: expected tensor {entry['name']!r} next")
        buf = self._bytes_of(entry, data)
        if first:
            self._pad_to(entry["offset_bytes"])
            self._piece_bytes = 0
        elif self._piece_bytes is None:
            raise FormatError(f"write_part({name!r}): its first piece was not marked first=True")
        self._piece_bytes += buf.nbytes
        if self._piece_bytes > entry["nbytes"] or (last and self._piece_bytes != entry["nbytes"]):
            raise FormatError(
                f"tensor {name!r} ({entry['dtype']} {entry['shape']}): pieces total "
                f"{self._piece_bytes} bytes, expected {entry['nbytes']}"
            )
        self._emit(buf)
        if last:
            self._next += 1
            self._piece_bytes = None

    def close(self) -> Path:
        """Finish: every tensor must have been written; fsync + atomic rename. Returns the path."""
        if self._closed:
            return self.path
        if self._next != len(self.entries):
            missing = self.entries[self._next]["name"]
            self.abort()
            raise FormatError(
                f"close(): {len(self.entries) - self._next} tensor(s) not written, next {missing!r}"
            )
        try:
            self._f.flush()
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


__all__ = ["CellmWriter", "write_cellm", "header_from_config", "plan_layout", "check_required_keys"]
