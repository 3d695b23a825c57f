"""Convert a source checkpoint into a ``.cellm`` file with a profile (streaming, atomic, deterministic).

Tensors are processed in name order, big tensors in row chunks, by a small thread pool (numpy
releases the GIL) that starts while the header and writer are being set up; results are consumed
in order and streamed through :class:`CellmWriter`'s chunked API (hashing as it writes), so peak
memory is a few chunks plus the small companion (scale/zero-point) arrays. Every output — the
``.cellm`` and its sidecars ``<stem>.tokenizer.json`` / ``<stem>.NOTICE`` — is written to a temp file
in the target directory (sidecars ``.<name>.tmp-<pid>``, written and fsynced on a side thread
during the quantization; the ``.cellm`` CellmWriter's ``.<name>.<random>.tmp``) and renamed into
place, sidecars first; on any error the temp files are removed and no ``.cellm`` appears (a SIGKILL
can only leave temp files behind, which ``cellm.pipeline.clean_stale_temp`` recognises).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cellm import __version__
from cellm.errors import CellmError, QuantizationError
from cellm.format.writer import CellmWriter
from cellm.format.constants import DTYPES
from cellm.profile import Plan, Profile, load_profile

CHUNK_BYTES = 8 << 20  # f32 bytes of source rows per work item
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    path: Path
    sha256: str
    nbytes: int
    bytes_per_scheme: dict
    profile: str
    profile_hash: str
    source: dict  # provenance recorded in the header (cellm_source)
    tokenizer: Path | None
    notice: Path | None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("path", "tokenizer", "notice"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def temp_path(final: Path) -> Path:
    """The temp name used while writing ``final`` (same directory, recognisable by the pipeline)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = _write_temp(final, data)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_temp(final: Path, data: bytes) -> Path:
    """Write ``data`` to ``final``'s temp file and fsync it (the rename is the caller's)."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def default_output_name(source_name: str, profile_name: str) -> str:
    return f"{source_name}-{profile_name}.cellm"


def _read_blob(value: Any) -> bytes | None:
    """A sidecar's bytes from a path, text, bytes or JSON-able object (None when absent)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, Path) or (isinstance(value, str) and len(value) < 4096 and os.path.isfile(value)):
        return Path(value).read_bytes()
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _header(source, profile: Profile, plan: Plan, tok_sha: str | None) -> dict[str, Any]:
    from cellm.format.writer import header_from_config

    header = dict(header_from_config(source.config, getattr(source, "raw_config", None)))
    prov = dict(getattr(source, "provenance", {}) or {})
    cellm_source = {
        "spec": prov.get("spec", getattr(source, "name", None)),
        "repo": prov.get("repo"),
        "revision": prov.get("revision"),
        "commit": prov.get("commit"),
        "checkpoint_sha256": getattr(source, "content_hash", None) or prov.get("checkpoint_sha256"),
    }
    for k, v in sorted(prov.items()):
        if k not in cellm_source and (v is None or isinstance(v, (str, int, float, bool))):
            cellm_source[k] = v
    exts = sorted({s.dtype for e in plan.entries for s in e.specs if DTYPES[s.dtype].is_extension})
    header.update(
        cellm_version=__version__,
        cellm_profile={"name": profile.name, "sha256": profile.content_hash, "gate_class": profile.gate_class},
        cellm_schemes={e.name: e.scheme for e in plan.entries if e.quantized},
        cellm_extensions=exts,
        cellm_source=cellm_source,
        cellm_tokenizer_sha256=tok_sha,
    )
    return header


def _work_items(source, plan: Plan) -> Iterator[tuple[Any, slice | None]]:
    for e in plan.entries:
        row_local = getattr(_scheme(e.scheme), "row_local", True)
        if len(e.shape) < 2 or not row_local:
            yield e, None
            continue
        rows, row_bytes = e.shape[0], 4 * int(np.prod(e.shape[1:]))
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for r0 in range(0, rows, step):
            yield e, slice(r0, min(rows, r0 + step))


def _scheme(name: str):
    from cellm.quant.schemes import get_scheme

    return get_scheme(name)


def _process(source, entry, rows: slice | None, calibration: Any = None) -> dict[str, np.ndarray]:
    w = source.load(entry.name, rows=rows) if rows is not None else source.load(entry.name)
    w = np.asarray(w)
    if len(entry.shape) >= 2:
        w = w.reshape((-1,) + tuple(entry.shape[1:]))
    else:
        w = w.reshape(entry.shape)
    try:
        scheme = _scheme(entry.scheme)
        if getattr(scheme, "needs_calibration", False):  # e.g. q4g32-gptq (cellm.quality)
            return scheme.quantize(w, hessian=calibration.hessian(entry.name))
        return scheme.quantize(w)
    except QuantizationError as exc:
        where = f" rows {rows.start}:{rows.stop}" if rows is not None else ""
        raise QuantizationError(f"tensor {entry.name}{where}: {exc}") from exc


def quantize_items(source, plan: Plan, calibration: Any = None) -> Iterator[tuple[Any, slice | None, dict[str, np.ndarray]]]:
    """Quantize ``plan``'s tensors one work item at a time, in :func:`convert`'s order and row chunks:
    yields ``(entry, rows, parts)``; ``parts`` maps a name suffix ('' = the tensor, '.qscale', …) to
    the chunk's array. Sequential (what a pipeline shard task runs); :func:`convert` overlaps the same
    items on a pool."""
    for entry, rows in _work_items(source, plan):
        yield entry, rows, _process(source, entry, rows, calibration)


def _quantize_in_order(source, plan: Plan, pool: cf.Executor, threads: int, calibration: Any):
    """Start quantizing the work items on ``pool`` now (at most ``threads + 1`` in flight, so memory
    stays a few chunks); returns ``(results, cancel)``: ``results`` yields ``(entry, rows, parts)``
    in order, ``cancel()`` drops the queued work (call it when the results are not all consumed)."""
    items = _work_items(source, plan)
    window: collections.deque = collections.deque()

    def fill() -> None:
        while len(window) < threads + 1:
            nxt = next(items, None)
            if nxt is None:
                return
            window.append((nxt[0], nxt[1], pool.submit(_process, source, *nxt, calibration)))

    def results() -> Iterator[tuple[Any, slice | None, dict[str, np.ndarray]]]:
        while window:
            entry, rows, fut = window.popleft()
            parts = fut.result()
            fill()
            yield entry, rows, parts

    def cancel() -> None:
        for _, _, fut in window:
            fut.cancel()
        window.clear()

    fill()
    return results(), cancel


def _write_results(results, writer: CellmWriter, progress: Progress | None) -> None:
    """Stream quantized work items into ``writer``: the main tensor chunk by chunk, its companions
    (scales, zero points) once its last chunk is in."""
    total = sum(e["nbytes"] for e in writer.entries)
    done = 0
    sink = None
    companions: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for entry, rows, parts in results:
        if rows is None or rows.start == 0:
            sink = writer.tensor(entry.name)
        main = parts.pop("")
        sink.write(main)
        done += main.nbytes
        del main
        for suf, arr in parts.items():
            companions[suf].append(arr)
        del parts
        if rows is None or rows.stop == entry.shape[0]:
            sink.close()
            for spec in entry.specs[1:]:
                chunks = companions.pop(spec.name[len(entry.name):])
                arr = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)
                writer.write(spec.name, arr)
                done += spec.nbytes
            if companions:
                raise CellmError(f"tensor {entry.name}: unexpected parts {sorted(companions)}")
        if progress is not None:
            progress(entry.name, done, total)


def convert(
    source: Any,
    profile: str | Path | Profile,
    out: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike = ".",
    progress: Progress | None = None,
    threads: int = 2,
    calibration: Any = None,
) -> ConvertResult:
    """Convert ``source`` (a spec string/path or an open Checkpoint) with ``profile``."""
    if isinstance(source, (str, os.PathLike)):
        from cellm.sources import open_source

        source = open_source(str(source))
    prof = load_profile(profile)
    shapes = {n: tuple(source.shape(n)) for n in source.tensor_names()}
    if getattr(source.config, "tie_word_embeddings", True):
        shapes.pop("lm_head.weight", None)  # tied: the runtime uses model.embed_tokens.weight
    plan = prof.plan(shapes)
    if calibration is None and any(getattr(_scheme(e.scheme), "needs_calibration", False) for e in plan.entries):
        # calibration-based schemes (cellm.quality): X^T X per weight input, cached per source
        from cellm.quality.calibration import calibration_stats

        calibration = calibration_stats(source)
    final = Path(out) if out is not None else Path(out_dir) / default_output_name(source.name, prof.name)
    if final.suffix != ".cellm":
        raise CellmError(f"output {str(final)!r} must end in .cellm")
    threads = max(1, int(threads))
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        # the workers start on the first tensors while the header, sidecars and writer are set up
        results, cancel = _quantize_in_order(source, plan, pool, threads, calibration)
        try:
            return write_artifact(source, prof, plan, final, lambda w: _write_results(results, w, progress))
        finally:
            cancel()  # on error: drop the queued work instead of finishing it


def write_artifact(source: Any, prof: Profile, plan: Plan, final: str | os.PathLike,
                   fill: Callable[[CellmWriter], None]) -> ConvertResult:
    """Write the ``.cellm`` of ``plan`` (convert's header) and its sidecars, atomically.

    ``fill(writer)`` writes every tensor through the public :class:`CellmWriter` API (in
    ``writer.names`` order); meanwhile a side thread writes and fsyncs the sidecars' temp files.
    Sidecars are renamed into place first, then the ``.cellm``; on any error the temp files are
    removed (and the sidecars too when no ``.cellm`` existed before)."""
    final = Path(final)
    if final.suffix != ".cellm":
        raise CellmError(f"output {str(final)!r} must end in .cellm")
    final.parent.mkdir(parents=True, exist_ok=True)
    stem = final.with_suffix("")
    tok_bytes = _read_blob(getattr(source, "tokenizer_json", None))
    notice_bytes = _read_blob(getattr(source, "notice", None))
    tok_sha = hashlib.sha256(tok_bytes).hexdigest() if tok_bytes is not None else None
    header = _header(source, prof, plan, tok_sha)
    writer = CellmWriter(final, header, plan.specs(), digest=True)
    tok_path = stem.with_name(stem.name + ".tokenizer.json") if tok_bytes is not None else None
    notice_path = stem.with_name(stem.name + ".NOTICE") if notice_bytes is not None else None
    sidecars = [(p, b) for p, b in ((tok_path, tok_bytes), (notice_path, notice_bytes)) if p is not None]
    renamed: list[Path] = []
    had_cellm = final.exists()
    try:
        with cf.ThreadPoolExecutor(max_workers=1) as side:
            side_jobs = [side.submit(_write_temp, p, b) for p, b in sidecars]
            try:
                fill(writer)
            finally:
                side_errors = [j.exception() for j in side_jobs]  # waits; temp files exist or not
        for err in side_errors:
            if err is not None:
                raise err
        # sidecars first (each fsynced, renamed), then the .cellm: a .cellm never lacks its tokenizer
        for p, _ in sidecars:
            os.replace(temp_path(p), p)
            renamed.append(p)
        writer.close()
    except BaseException:
        writer.abort()
        for p, _ in sidecars:
            temp_path(p).unlink(missing_ok=True)
        if not had_cellm:  # nothing of a failed first conversion stays behind
            for p in renamed:
                p.unlink(missing_ok=True)
        raise
    return ConvertResult(
        path=final, sha256=writer.sha256, nbytes=writer.nbytes, bytes_per_scheme=plan.bytes_per_scheme,
        profile=prof.name, profile_hash=prof.content_hash, source=header["cellm_source"],
        tokenizer=tok_path, notice=notice_path,
    )
