"""Validate a ``.cellm`` file: structure, semantics and (with a source checkpoint) numerics.

The validator parses the container itself (it must survive any corrupted input and report every
problem it can, naming the tensor and its offset), then checks Gemma-3 semantics from the header,
and finally — when given the source checkpoint — that each tensor's dequantization error stays
within its scheme's bound. Large tensors are scanned in row chunks; nothing is loaded whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import CellmError
from cellm.format.constants import (
    ALIGNMENT,
    COMPANION_SUFFIXES,
    DTYPES,
    MAGIC,
    MAX_HEADER_LEN,
    MAX_NDIM,
    PREFIX_LEN,
    REQUIRED_HEADER_KEYS,
    SCALE_SUFFIX,
    VERSION,
    ZERO_DTYPE,
    ZERO_SUFFIX,
    TensorInfo,
    align_up,
    get_dtype,
    is_groupwise,
)
from cellm.names import expected_tensors

CHUNK_BYTES = 32 << 20  # rows per scan chunk are chosen to stay near this many bytes
QUANTIZED = ("i8", "i4")  # per-row v1 dtypes; group-wise q4g*/q6g* via is_groupwise
_HEADER_TO_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_dim": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # truncated, magic, version, header, dtype, nbytes, bounds, alignment, overlap, ...
    tensor: str | None
    offset: int | None
    message: str

    def __str__(self) -> str:
        where = ""
        if self.tensor is not None:
            where += f" tensor {self.tensor}"
        if self.offset is not None:
            where += f" @ offset {self.offset}"
        return f"[{self.kind}]{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    path: str
    ok: bool
    problems: tuple[Problem, ...]
    checked: dict  # counts: tensors, structure, semantics, numerics (tensors compared to the source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "checked": dict(self.checked),
            "problems": [p.to_dict() for p in self.problems],
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _quantized(dtype: str) -> bool:
    return dtype in QUANTIZED or is_groupwise(dtype)


class _Validator:
    def __init__(self, path: Path):
        self.path = path
        self.problems: list[Problem] = []
        self.checked = {"tensors": 0, "structure": 0, "semantics": 0, "numerics": 0}
        self.buf: mmap.mmap | bytes = b""
        self.header: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}  # structurally sound tensors only
        self.data_start = 0
        self.all_names: set = set()

    def add(self, kind: str, tensor: str | None, offset: int | None, message: str) -> None:
        self.problems.append(Problem(kind, tensor, offset, message))

    # -------------------------------------------------------------- structure
    def structure(self) -> bool:
        size = len(self.buf)
        if size < PREFIX_LEN:
            self.add("truncated", None, 0, f"file is {size} bytes, shorter than the {PREFIX_LEN}-byte prefix")
            return False
        if bytes(self.buf[: len(MAGIC)]) != MAGIC:
            self.add("magic", None, 0, f"bad magic {bytes(self.buf[:len(MAGIC)])!r}, expected {MAGIC!r}")
            return False
        version = self.buf[len(MAGIC)]
        if version != VERSION:
            self.add("version", None, len(MAGIC), f"version {version} unsupported, expected {VERSION}")
            return False
        (hlen,) = struct.unpack_from("<I", self.buf, len(MAGIC) + 1)
        if hlen > MAX_HEADER_LEN or PREFIX_LEN + hlen > size:
            self.add("header", None, len(MAGIC) + 1,
                     f"header length {hlen} passes EOF ({size} bytes) or the limit {MAX_HEADER_LEN}")
            return False
        try:
            header = json.loads(bytes(self.buf[PREFIX_LEN : PREFIX_LEN + hlen]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self.add("header", None, PREFIX_LEN, f"header is not valid UTF-8 JSON: {exc}")
            return False
        if not isinstance(header, dict):
            self.add("header", None, PREFIX_LEN, f"header must be a JSON object, got {type(header).__name__}")
            return False
        self.header = header
        self.data_start = align_up(PREFIX_LEN + hlen)
        for key, types in REQUIRED_HEADER_KEYS.items():
            v = header.get(key)
            if key not in header:
                self.add("header", None, PREFIX_LEN, f"required header key {key!r} missing")
            elif isinstance(v, bool) or not isinstance(v, types):
                self.add("header", None, PREFIX_LEN,
                         f"header key {key!r}={v!r:.80} must be {'/'.join(t.__name__ for t in types)}")
        pad = bytes(self.buf[PREFIX_LEN + hlen : min(self.data_start, size)])
        if pad.strip(b"\0"):
            self.add("padding", None, PREFIX_LEN + hlen, "header padding bytes are not zero")
        entries = header.get("tensors")
        if not isinstance(entries, list):
            return False
        self._entries(entries, size)
        return True

    def _entries(self, entries: list, size: int) -> None:
        seen: set[str] = set()
        names: list[str] = []
        spans: list[tuple[int, int, str]] = []
        for i, e in enumerate(entries):
            self.checked["tensors"] += 1
            if not isinstance(e, dict):
                self.add("header", None, None, f"tensors[{i}] is not an object: {e!r:.80}")
                continue
            name, dtype, shape = e.get("name"), e.get("dtype"), e.get("shape")
            off, nb = e.get("offset_bytes"), e.get("nbytes")
            if not isinstance(name, str):
                self.add("header", None, off if _is_int(off) else None, f"tensors[{i}].name={name!r:.80} is not a string")
                continue
            names.append(name)
            if name in seen:
                self.add("duplicate", name, off if _is_int(off) else None, f"tensor name {name!r} appears more than once")
                continue
            seen.add(name)
            ok = True
            if not _is_int(off) or not _is_int(nb) or off < 0 or nb < 0:
                self.add("header", name, None, f"offset_bytes={off!r} / nbytes={nb!r} must be non-negative integers")
                continue
            if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                    or not all(_is_int(d) and d >= 0 for d in shape)):
                self.add("shape", name, off, f"shape={shape!r:.80} must be a list of <= {MAX_NDIM} non-negative integers")
                continue
            try:
                want = get_dtype(dtype, name).nbytes(tuple(shape)) if isinstance(dtype, str) else None
                if want is None:
                    raise CellmError(f"dtype {dtype!r} is not a string")
                DTYPES[dtype].check_shape(tuple(shape), repr(name))
            except (CellmError, ValueError, TypeError, KeyError) as exc:
                self.add("dtype", name, off, str(exc))
                continue
            if nb != want:
                self.add("nbytes", name, off,
                         f"nbytes={nb} but dtype {dtype} with shape {shape} needs {want} bytes")
                ok = False
            if off % ALIGNMENT:
                self.add("alignment", name, off, f"offset {off} is not a multiple of {ALIGNMENT}")
                ok = False
            if off < self.data_start:
                self.add("bounds", name, off, f"offset {off} lies inside the prefix/header (data starts at {self.data_start})")
                ok = False
            if off + nb > size:
                self.add("bounds", name, off, f"tensor ends at {off + nb}, past EOF ({size} bytes): file truncated?")
                ok = False
            spans.append((off, off + nb, name))
            if ok:
                self.tensors[name] = TensorInfo(name, dtype, tuple(shape), off, nb)
        for a, b in zip(names, names[1:]):
            if b < a:
                self.add("order", b, None, f"tensors are not sorted by name: {b!r} follows {a!r}")
                break
        spans.sort()
        end, owner = 0, None
        for s, t, name in spans:
            if t == s:
                continue
            if s < end:
                self.add("overlap", name, s, f"bytes [{s}, {t}) overlap tensor {owner} ending at {end}")
                self.tensors.pop(name, None)
                self.tensors.pop(owner, None)
            if t > end:
                end, owner = t, name
        self.checked["structure"] = len(self.tensors)

    # -------------------------------------------------------------- semantics
    def storage(self, info: TensorInfo) -> np.ndarray:
        dt = DTYPES[info.dtype]
        return np.frombuffer(self.buf, dtype=dt.storage, count=info.nbytes // dt.storage.itemsize,
                             offset=info.offset).reshape(dt.storage_shape(info.shape))

    def config(self) -> GemmaTextConfig | None:
        raw = self.header.get("source_text_config")
        try:
            if isinstance(raw, dict):
                return GemmaTextConfig.from_hf(raw)
            return GemmaTextConfig.from_hf({
                "model_type": self.header.get("model_type"),
                **{cfg_key: self.header.get(h) for h, cfg_key in _HEADER_TO_CONFIG.items()},
                "head_dim": self.header.get("head_dim"),
                "tie_word_embeddings": self.header.get("tie_word_embeddings", True),
            })
        except (CellmError, ValueError, TypeError) as exc:
            self.add("config", None, PREFIX_LEN, f"cannot derive a Gemma-3 config from the header: {exc}")
            return None

    def semantics(self) -> GemmaTextConfig | None:
        cfg = self.config()
        all_names = self.all_names = {
            e.get("name") for e in self.header.get("tensors", []) if isinstance(e, dict)
        }
        if cfg is not None:
            for hkey, ckey in _HEADER_TO_CONFIG.items():
                hv = self.header.get(hkey)
                if _is_int(hv) and hv != getattr(cfg, ckey):
                    self.add("config", None, PREFIX_LEN,
                             f"header {hkey}={hv} disagrees with source_text_config {ckey}={getattr(cfg, ckey)}")
            expected = expected_tensors(cfg)
            self._extra(expected, cfg)
            for name, shape in expected.items():
                if name not in all_names:
                    self.add("missing", name, None, f"Gemma-3 tensor {name} {list(shape)} is missing")
                elif name in self.tensors and self.tensors[name].shape != shape:
                    info = self.tensors[name]
                    self.add("shape", name, info.offset,
                             f"shape {list(info.shape)} disagrees with the config's {list(shape)}")
        exts_used = set()
        for name, info in self.tensors.items():
            if DTYPES[info.dtype].is_extension:
                exts_used.add(info.dtype)
            if name.endswith(COMPANION_SUFFIXES):
                main = name.rsplit(".", 1)[0]
                if main not in all_names:
                    self.add("companion", name, info.offset, f"companion of a missing tensor {main}")
                continue
            self._companions(info)
            self._finite(info)
            self.checked["semantics"] += 1
        exts = self.header.get("cellm_extensions", [])
        if not isinstance(exts, list) or sorted(set(map(str, exts))) != sorted(exts_used):
            self.add("extensions", None, PREFIX_LEN,
                     f"cellm_extensions={exts!r} but the file uses extension dtypes {sorted(exts_used)}")
        schemes = self.header.get("cellm_schemes", {})
        if not isinstance(schemes, dict):
            self.add("header", None, PREFIX_LEN, f"cellm_schemes must be an object, got {schemes!r:.80}")
        else:
            for tname, sname in schemes.items():
                info = self.tensors.get(tname)
                if tname not in all_names:
                    self.add("scheme", tname, None, f"cellm_schemes names tensor {tname} that is not in the file")
                elif info is not None:
                    try:
                        from cellm.quant.schemes import get_scheme

                        sdt = get_scheme(sname).dtype
                    except (CellmError, KeyError) as exc:
                        self.add("scheme", tname, info.offset, f"unknown scheme {sname!r}: {exc}")
                        continue
                    if sdt != info.dtype:
                        self.add("scheme", tname, info.offset,
                                 f"scheme {sname} stores dtype {sdt} but the tensor is {info.dtype}")
        return cfg

    def _extra(self, expected: dict[str, tuple[int, ...]], cfg: GemmaTextConfig) -> None:
        """Tensors that are neither Gemma-3 tensors of this config nor a companion of one."""
        for e in self.header.get("tensors", []):
            name = e.get("name") if isinstance(e, dict) else None
            if not isinstance(name, str) or name in expected:
                continue
            main = name.rsplit(".", 1)[0] if name.endswith(COMPANION_SUFFIXES) else None
            if main is not None and main in expected:
                continue
            off = e.get("offset_bytes")
            why = (f"a companion of {main}, which is not a Gemma-3 tensor" if main is not None
                   else "neither a Gemma-3 tensor nor a companion of one")
            self.add("extra", name, off if _is_int(off) else None,
                     f"unexpected tensor at offset {off}: {why} for this config "
                     f"({cfg.num_hidden_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})")

    def _companions(self, info: TensorInfo) -> None:
        name, dtype = info.name, info.dtype
        scale, zero = self.tensors.get(name + SCALE_SUFFIX), self.tensors.get(name + ZERO_SUFFIX)
        names = self.all_names
        if not _quantized(dtype):
            for suf in COMPANION_SUFFIXES:
                if name + suf in names:
                    self.add("companion", name + suf, None, f"{dtype} tensor {name} must not have a {suf} companion")
            return
        rows = info.shape[0] if info.shape else 0
        if is_groupwise(dtype):
            nb = -(-info.shape[1] // DTYPES[dtype].block)
            want_scale, want_zero = (rows, nb), (rows, nb)
        else:
            want_scale, want_zero = (rows,), None
        if scale is None:
            self.add("companion", name, info.offset, f"{dtype} tensor needs companion {name}{SCALE_SUFFIX} (f16 {list(want_scale)})")
        elif scale.dtype != "f16" or scale.shape != want_scale:
            self.add("companion", scale.name, scale.offset,
                     f"must be f16 {list(want_scale)}, is {scale.dtype} {list(scale.shape)}")
        else:
            s = self.storage(scale).astype(np.float32)
            # symmetric group-wise int4 (no .qzero) maps the largest-magnitude value to -8, so
            # its scales carry that value's sign: there they must only be finite and non-zero
            signed = is_groupwise(dtype) and zero is None and name + ZERO_SUFFIX not in names
            ok = np.isfinite(s) & ((s != 0) if signed else (s > 0))
            bad = ~ok
            if bad.any():
                idx = np.unravel_index(int(np.argmax(bad)), s.shape)
                need = "finite and non-zero" if signed else "finite and > 0"
                self.add("scale", scale.name, scale.offset,
                         f"{int(bad.sum())} scale(s) not {need}, first at {list(map(int, idx))} = {s[idx]}")
        if want_zero is None:
            if name + ZERO_SUFFIX in names:
                self.add("companion", name + ZERO_SUFFIX, None, f"{dtype} tensor {name} must not have a {ZERO_SUFFIX}")
        elif zero is not None and (zero.dtype != ZERO_DTYPE[DTYPES[dtype].bits] or zero.shape != want_zero):
            self.add("companion", zero.name, zero.offset,
                     f"must be {ZERO_DTYPE[DTYPES[dtype].bits]} {list(want_zero)}, is {zero.dtype} {list(zero.shape)}")
        elif zero is not None and zero.dtype == "u8":
            zmax = (1 << DTYPES[dtype].bits) - 1
            z = self.storage(zero)
            if z.size and int(z.max()) > zmax:
                idx = np.unravel_index(int(np.argmax(z > zmax)), z.shape)
                self.add("zero", zero.name, zero.offset,
                         f"zero point {int(z[idx])} at {list(map(int, idx))} exceeds the {DTYPES[dtype].bits}-bit "
                         f"maximum {zmax}")

    def _finite(self, info: TensorInfo) -> None:
        if info.dtype != "f16" or info.nbytes == 0:
            return
        bits = np.frombuffer(self.buf, dtype="<u2", count=info.nbytes // 2, offset=info.offset)
        step = CHUNK_BYTES // 2
        for s in range(0, bits.size, step):
            bad = (bits[s : s + step] & 0x7C00) == 0x7C00
            if bad.any():
                i = s + int(np.argmax(bad))
                self.add("nonfinite", info.name, info.offset,
                         f"NaN/Inf at flat element {i} (byte offset {info.offset + 2 * i})")
                return

    # -------------------------------------------------------------- numerics
    def numerics(self, source) -> None:
        from cellm.quant.schemes import get_scheme, scheme_for_dtype

        schemes = self.header.get("cellm_schemes") if isinstance(self.header.get("cellm_schemes"), dict) else {}
        src_names = set(source.tensor_names())
        for name, info in sorted(self.tensors.items()):
            if name.endswith(COMPANION_SUFFIXES) or name not in src_names:
                continue
            if tuple(source.shape(name)) != info.shape:
                self.add("numerics", name, info.offset,
                         f"shape {list(info.shape)} differs from the source's {list(source.shape(name))}")
                continue
            try:
                if name in schemes:
                    scheme = get_scheme(schemes[name])
                else:
                    scheme = scheme_for_dtype(info.dtype, name + ZERO_SUFFIX in self.tensors)
                parts = {"": self.storage(info)}
                for suf in COMPANION_SUFFIXES:
                    if name + suf in self.tensors:
                        parts[suf] = self.storage(self.tensors[name + suf])
                self._compare(name, info, scheme, parts, source)
                self.checked["numerics"] += 1
            except Exception as exc:  # noqa: BLE001 - a bad tensor must not abort the report
                self.add("numerics", name, info.offset, f"cannot compare with the source: {exc}")

    def _compare(self, name, info, scheme, parts, source) -> None:
        shape = info.shape
        rows = shape[0] if len(shape) >= 1 else 1
        row_elems = max(1, math.prod(shape[1:]))
        step = max(1, CHUNK_BYTES // (4 * row_elems))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if len(shape) <= 1:
                w = np.asarray(source.load(name), dtype=np.float32).reshape(shape)
                got = scheme.dequantize(parts, shape)
                r1 = rows
            else:
                w = np.asarray(source.load(name, rows=slice(r0, r1)), dtype=np.float32)
                got = scheme.dequantize({k: v[r0:r1] for k, v in parts.items()}, (r1 - r0,) + shape[1:])
            bound = np.asarray(scheme.error_bound(w), dtype=np.float32)
            err = np.abs(got.astype(np.float32) - w)
            if err.ndim >= 2 and bound.ndim == 1:
                err = err.reshape(err.shape[0], -1).max(axis=1)
            elif bound.ndim == 0:
                err = np.asarray(err.max() if err.size else 0.0)
            tol = bound * (1 + 1e-5) + 1e-30
            over = ~(err <= tol)
            if over.any():
                i = int(np.argmax(over)) if over.ndim else 0
                e = float(err.flat[i])
                b = float(bound.flat[i] if bound.ndim else bound)
                row = r0 + i if over.ndim else None
                where = f" (row {row})" if row is not None else ""
                self.add("numerics", name, info.offset,
                         f"dequantization error {e:.3g}{where} exceeds scheme {scheme.name} bound {b:.3g}")
                return
            if len(shape) <= 1:
                return


def validate(path: str | os.PathLike, source: Any = None) -> ValidationReport:
    """Check a .cellm file; ``source`` (a spec or an open Checkpoint) enables the numerics checks."""
    p = Path(path)
    v = _Validator(p)
    try:
        f = open(p, "rb")
    except OSError as exc:
        v.add("io", None, None, f"cannot open {p}: {exc}")
        return ValidationReport(str(p), False, tuple(v.problems), v.checked)
    with f:
        size = os.fstat(f.fileno()).st_size
        v.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            try:
                structure_ok = v.structure()
                if structure_ok:
                    v.semantics()
            except Exception as exc:  # safety net: corrupted input must never crash the validator
                v.add("internal", None, None, f"validator could not finish: {type(exc).__name__}: {exc}")
                structure_ok = False
            if structure_ok:
                if source is not None:
                    if isinstance(source, (str, os.PathLike)):
                        from cellm.sources import open_source

                        source = open_source(str(source))
                    v.numerics(source)
        finally:
            if isinstance(v.buf, mmap.mmap):
                try:
                    v.buf.close()
                except BufferError:  # a numpy view still alive; the GC will release it
                    pass
    return ValidationReport(str(p), not v.problems, tuple(v.problems), v.checked)
