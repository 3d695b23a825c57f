"""`.cellm` v1 reader: mmaps the file read-only and hands out zero-copy numpy views.

Opening validates only what is needed to read safely (magic, version, header length and bounds,
header JSON shape, every ``tensors[]`` entry well-typed and inside the file, no duplicate names).
Semantic/structural checks (overlaps, alignment, missing tensors, NaN) live in ``cellm.validate``.
Every problem raises ``FormatError`` naming it (and the tensor / offset where relevant). Unknown
dtypes are tolerated on open (like upstream); viewing or dequantizing such a tensor raises.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cellm.errors import CellmError, FormatError
from cellm.format.constants import (
    COMPANION_DTYPES,
    DTYPES,
    MAGIC,
    MAX_DIM,
    MAX_HEADER_LEN,
    MAX_NDIM,
    MIN_FILE_SIZE,
    PREFIX_LEN,
    VERSION,
    ZERO_SUFFIX,
    TensorInfo,
    align_up,
    get_dtype,
    is_groupwise,
)


def _reject_constant(name: str) -> Any:
    raise FormatError(f"header JSON contains {name}, which is not valid JSON")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_prefix(prefix: bytes, file_size: int) -> int:
    """Check magic/version/header length of the first 10 bytes; returns the header length."""
    if file_size < MIN_FILE_SIZE or len(prefix) < PREFIX_LEN:
        raise FormatError(f"file is {file_size} bytes, smaller than the {MIN_FILE_SIZE}-byte prefix")
    if prefix[:5] != MAGIC:
        raise FormatError(f"bad magic {bytes(prefix[:5])!r} at offset 0, expected {MAGIC!r}")
    version = prefix[5]
    if version != VERSION:
        raise FormatError(f"unsupported version {version} at offset 5, expected {VERSION}")
    (header_len,) = struct.unpack("<I", bytes(prefix[6:10]))
    if header_len > MAX_HEADER_LEN:
        raise FormatError(f"header length {header_len} (offset 6) exceeds the limit {MAX_HEADER_LEN}")
    if PREFIX_LEN + header_len > file_size:
        raise FormatError(
            f"header end {PREFIX_LEN + header_len} (length {header_len}) is past the end of the "
            f"file ({file_size} bytes)"
        )
    return header_len


def parse_header(blob: bytes) -> dict[str, Any]:
    """Header bytes -> dict with a ``tensors`` list (FormatError on anything else)."""
    try:
        header = json.loads(blob.decode("utf-8"), parse_constant=_reject_constant)
    except FormatError:
        raise
    except UnicodeDecodeError as exc:
        raise FormatError(f"header is not UTF-8 (byte {PREFIX_LEN + exc.start}): {exc.reason}") from exc
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"header JSON does not parse: {exc}") from exc
    if not isinstance(header, dict):
        raise FormatError(f"header must be a JSON object, got {type(header).__name__}")
    if not isinstance(header.get("tensors"), list):
        raise FormatError(f"header 'tensors' must be a list, got {header.get('tensors')!r:.80}")
    return header


def parse_entry(i: int, e: Any, file_size: int) -> TensorInfo:
    if not isinstance(e, dict):
        raise FormatError(f"tensors[{i}] must be an object, got {e!r:.80}")
    name = e.get("name")
    if not isinstance(name, str) or not name:
        raise FormatError(f"tensors[{i}].name={name!r:.80} must be a non-empty string")
    dtype = e.get("dtype")
    if not isinstance(dtype, str):
        raise FormatError(f"tensor {name!r}: dtype {dtype!r:.80} must be a string")
    shape = e.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape)):
        raise FormatError(
            f"tensor {name!r}: shape {shape!r:.80} must be a list of at most {MAX_NDIM} integers "
            f"in [0, {MAX_DIM}]"
        )
    off, nbytes = e.get("offset_bytes"), e.get("nbytes")
    for key, v in (("offset_bytes", off), ("nbytes", nbytes)):
        if not _is_int(v) or v < 0:
            raise FormatError(f"tensor {name!r}: {key}={v!r:.80} must be a non-negative integer")
    if off + nbytes > file_size:
        raise FormatError(
            f"tensor {name!r} at offset {off} with nbytes {nbytes} ends at {off + nbytes}, past the "
            f"end of the file ({file_size} bytes)"
        )
    return TensorInfo(name, dtype, tuple(shape), off, nbytes)


class CellmReader:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.file_size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(PREFIX_LEN)
        except OSError as exc:
            raise FormatError(f"cannot open {self.path}: {exc}") from exc
        self.header_len = parse_prefix(prefix, self.file_size)
        try:
            self._mm: np.ndarray | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise FormatError(f"cannot mmap {self.path}: {exc}") from exc
        if self._mm.size != self.file_size:
            raise FormatError(f"{self.path} changed size while opening")
        self.header = parse_header(bytes(self._mm[PREFIX_LEN: PREFIX_LEN + self.header_len]))
        self.data_start = align_up(PREFIX_LEN + self.header_len)
        self.entries = [parse_entry(i, e, self.file_size) for i, e in enumerate(self.header["tensors"])]
        self.tensors: dict[str, TensorInfo] = {}
        for t in self.entries:
            if t.name in self.tensors:
                raise FormatError(
                    f"duplicate tensor name {t.name!r} (offsets {self.tensors[t.name].offset} and {t.offset})"
                )
            self.tensors[t.name] = t
        self._config = None

    # ------------------------------------------------------------------ metadata
    @property
    def config(self):
        """``GemmaTextConfig`` from ``source_text_config`` (else from the upstream keys)."""
        if self._config is None:
            from cellm.config import GemmaTextConfig

            src = self.header.get("source_text_config")
            raw = src if isinstance(src, dict) and src else config_dict_from_header(self.header)
            try:
                self._config = GemmaTextConfig.from_hf(raw)
            except CellmError:
                raise
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
                raise FormatError(f"header model config is invalid: {exc}") from exc
        return self._config

    @property
    def extensions(self) -> list[str]:
        """Extension dtypes the tensors actually use (sorted); compare ``header['cellm_extensions']``."""
        return sorted({t.dtype for t in self.entries if t.dtype in DTYPES and DTYPES[t.dtype].is_extension})

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"no tensor named {name!r} in {self.path.name}") from None

    # ------------------------------------------------------------------ data
    def _map(self) -> np.ndarray:
        if self._mm is None:
            raise FormatError(f"{self.path.name} is closed")
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mmap."""
        t = self.info(name)
        return self._map()[t.offset: t.end].view(np.ndarray)

    def view(self, name: str) -> np.ndarray:
        """Typed zero-copy storage view (f16 / int8 / packed uint8 in the dtype's storage shape)."""
        t = self.info(name)
        dt = get_dtype(t.dtype, name)
        try:
            dt.check_shape(t.shape, f"tensor {name!r} at offset {t.offset}")
            storage_shape = dt.storage_shape(t.shape)
        except FormatError:
            raise
        except (ValueError, TypeError, ZeroDivisionError) as exc:  # pragma: no cover - defensive
            raise FormatError(f"tensor {name!r}: bad shape {list(t.shape)}: {exc}") from exc
        expected = dt.nbytes(t.shape)
        if expected != t.nbytes:
            raise FormatError(
                f"tensor {name!r} at offset {t.offset}: nbytes {t.nbytes} does not match dtype "
                f"{t.dtype} shape {list(t.shape)} (expected {expected})"
            )
        return self.raw(name).view(dt.storage).reshape(storage_shape)

    def scheme_parts(self, name: str) -> dict[str, np.ndarray]:
        """``{"": main, ".qscale": ..., ".qzero": ...}`` storage views (companions checked)."""
        from cellm.quant.schemes import expected_parts

        t = self.info(name)
        get_dtype(t.dtype, name)
        has_zero = (name + ZERO_SUFFIX) in self.tensors and is_groupwise(t.dtype)
        if t.dtype in ("f16",) + COMPANION_DTYPES:
            return {"": self.view(name)}
        specs = expected_parts(t.dtype, name, t.shape, has_zero)
        parts = {"": self.view(name)}
        for spec in specs[1:]:
            suffix = spec.name[len(name):]
            c = self.tensors.get(spec.name)
            if c is None:
                raise FormatError(
                    f"tensor {name!r} (dtype {t.dtype}, offset {t.offset}) needs companion "
                    f"{spec.name!r}, which is missing"
                )
            if c.dtype != spec.dtype or tuple(c.shape) != tuple(spec.shape):
                raise FormatError(
                    f"companion {spec.name!r} at offset {c.offset} is {c.dtype} {list(c.shape)}, "
                    f"expected {spec.dtype} {list(spec.shape)} for {name!r}"
                )
            parts[suffix] = self.view(spec.name)
        return parts

    def dequantize(self, name: str) -> np.ndarray:
        """float32 array of the logical shape."""
        from cellm.quant.schemes import dequantize_parts

        t = self.info(name)
        parts = self.scheme_parts(name)
        if t.dtype in COMPANION_DTYPES:
            raise FormatError(
                f"tensor {name!r} has dtype {t.dtype} (zero points), which is a companion and cannot "
                f"be dequantized on its own"
            )
        try:
            return dequantize_parts(t.dtype, parts, t.shape)
        except CellmError:
            raise
        except (ValueError, IndexError, TypeError) as exc:  # defensive: corrupt layouts
            raise FormatError(f"tensor {name!r} at offset {t.offset}: cannot dequantize: {exc}") from exc

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Drop the mapping (views already handed out stay valid until they are released)."""
        self._mm = None

    def __enter__(self) -> "CellmReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CellmReader({str(self.path)!r}, tensors={len(self.tensors)})"


def config_dict_from_header(h: dict[str, Any]) -> dict[str, Any]:
    """A HF-style config dict rebuilt from the upstream header keys (files without source config)."""
    d: dict[str, Any] = {
        "model_type": h.get("model_type"),
        "vocab_size": h.get("vocab_size"),
        "hidden_size": h.get("hidden_dim"),
        "intermediate_size": h.get("intermediate_size"),
        "num_hidden_layers": h.get("num_layers"),
        "num_attention_heads": h.get("num_heads"),
        "num_key_value_heads": h.get("num_kv_heads"),
        "rms_norm_eps": h.get("rms_norm_eps"),
        "rope_theta": h.get("rope_theta"),
    }
    for key in ("head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        if h.get(key) is not None:
            d[key] = h[key]
    return d


def open_cellm(path: str | os.PathLike) -> CellmReader:
    return CellmReader(path)
