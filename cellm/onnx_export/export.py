"""``export_onnx(cellm_path, out_dir)``: a ``.cellm`` artifact -> an onnxruntime(-genai) model folder.

Writes ``model.onnx`` + ``model.onnx.data`` (external data), ``genai_config.json``,
``tokenizer.json`` / ``tokenizer_config.json`` (and ``NOTICE`` when the artifact has one) into a
temporary directory next to ``out_dir``, checks the graph with ``onnx.checker`` (on the path, with
external data), then renames it into place. Nothing is half-written: on any error the temporary
directory is removed. A non-empty ``out_dir`` needs ``force=True`` (the old folder is replaced only
after the new one is complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cellm.config import GemmaTextConfig
from cellm.errors import CellmError, ExportError
from cellm.onnx_export.genai_config import make_genai_config, make_tokenizer_config
from cellm.onnx_export.graph import GraphOptions, Weight, make_model
from cellm.onnx_export.weights import FLOAT_DTYPES, QUANT_DTYPES, float_from_storage, nbits_from_storage

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "cellm_config.json"  # the model config (HF style) + export provenance, read by engine.py
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


class CellmWeightSource:
    """``graph.WeightSource`` over an open ``CellmReader``: stored bits -> graph weights."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.config: GemmaTextConfig = reader.config

    def _dtype(self, name: str) -> str:
        try:
            return self.reader.tensors[name].dtype
        except KeyError:
            raise ExportError(f"artifact has no tensor {name!r}") from None

    def linear(self, name: str) -> Weight:
        dtype = self._dtype(name)
        parts = self.reader.scheme_parts(name)
        shape = tuple(self.reader.tensors[name].shape)
        if dtype in FLOAT_DTYPES:
            if len(shape) != 2:
                raise ExportError(f"tensor {name!r} must be 2-D, got shape {list(shape)}")
            return float_from_storage(name, dtype, parts).reshape(shape)
        if dtype in QUANT_DTYPES:
            return nbits_from_storage(name, dtype, parts, shape)
        raise ExportError(
            f"tensor {name!r} has dtype {dtype!r} which the ONNX exporter cannot map; "
            f"supported: {', '.join(FLOAT_DTYPES + QUANT_DTYPES)}"
        )

    def vector(self, name: str) -> np.ndarray:
        dtype = self._dtype(name)
        if dtype in FLOAT_DTYPES:
            return float_from_storage(name, dtype, self.reader.scheme_parts(name)).astype(np.float32).reshape(-1)
        if dtype in QUANT_DTYPES:
            raise ExportError(f"1-D tensor {name!r} has quantized dtype {dtype!r}; the exporter expects f16 norms")
        raise ExportError(f"tensor {name!r} has dtype {dtype!r} which the ONNX exporter cannot map")

    def embedding(self) -> Weight:
        return self.linear("model.embed_tokens.weight")


def _check_supported(reader: Any) -> GemmaTextConfig:
    header = reader.header
    mt = str(header.get("model_type", ""))
    src = header.get("source_text_config") or {}
    smt = str(src.get("model_type", "")) if isinstance(src, dict) else ""
    if not (mt.startswith("gemma3") or smt.startswith("gemma3")):
        raise ExportError(f"model_type={mt!r} is not supported by the ONNX exporter (supported: gemma3, gemma3_text)")
    try:
        cfg = reader.config
    except CellmError as exc:
        raise ExportError(f"unsupported or invalid model config: {exc}") from exc
    if not cfg.tie_word_embeddings or "lm_head.weight" in reader.tensors:
        raise ExportError("untied LM heads (lm_head.weight) are not supported by the ONNX exporter")
    if cfg.final_logit_softcapping:
        raise ExportError(f"final_logit_softcapping={cfg.final_logit_softcapping} is not supported (Gemma-3 has none)")
    bad = {n: t.dtype for n, t in reader.tensors.items()
           if not n.endswith((".qscale", ".qzero")) and t.dtype not in FLOAT_DTYPES + QUANT_DTYPES}
    if bad:
        name = sorted(bad)[0]
        raise ExportError(
            f"tensor {name!r} has dtype {bad[name]!r} which the ONNX exporter cannot map "
            f"({len(bad)} such tensor(s)); supported: {', '.join(FLOAT_DTYPES + QUANT_DTYPES)}"
        )
    return cfg


def _cellm_config(cfg: GemmaTextConfig, header: dict, accuracy_level: int, ctx: int, int8_residual: bool) -> dict:
    d = cfg.to_hf_dict(style=5)
    d["cellm_export"] = {
        "accuracy_level": accuracy_level,
        "int8_residual": int8_residual,
        "context_length": ctx,
        "profile": header.get("cellm_profile"),
        "source": header.get("cellm_source"),
        "schemes": header.get("cellm_schemes"),
    }
    return d


def _tokenizer_json(cellm_path: Path) -> Path | None:
    for cand in (cellm_path.with_name(cellm_path.stem + ".tokenizer.json"), cellm_path.with_name("tokenizer.json")):
        if cand.is_file():
            return cand
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save_model(model: Any, tmp: Path) -> None:
    import onnx

    onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    for name in (MODEL_FILE, DATA_FILE):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    onnx.checker.check_model(str(tmp / MODEL_FILE))


def export_onnx(cellm_path: str | os.PathLike, out_dir: str | os.PathLike, *, accuracy_level: int = 4,
                force: bool = False, context_length: int | None = None, int8_residual: bool = False) -> Path:
    """Export ``cellm_path`` into the folder ``out_dir`` (created atomically); returns ``out_dir``.

    ``accuracy_level`` is MatMulNBits' (4 = int8 activations, the fast CPU path; 1 = float32).
    ``int8_residual`` (level 4 only) feeds every MatMulNBits the activations as an exactly-rounded int8
    part plus the remainder: level-1 accuracy from the int8 kernels, at a decode speed between the two.
    ``context_length`` caps the RoPE tables / genai context (default: max_position_embeddings).
    """
    from cellm.format.reader import CellmReader

    src = Path(os.fspath(cellm_path))
    out = Path(os.fspath(out_dir))
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level={accuracy_level!r} must be one of {list(ACCURACY_LEVELS)}")
    if int8_residual and accuracy_level != 4:
        raise ExportError(f"int8_residual needs accuracy_level 4 (got {accuracy_level}): lower levels compute in float32")
    if not src.is_file():
        raise ExportError(f"{src} does not exist or is not a file")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} is not empty ({len(list(out.iterdir()))} entries); use force=True / --force")
    try:
        reader = CellmReader(src)
    except CellmError as exc:
        raise ExportError(f"cannot read {src}: {exc}") from exc
    with reader:
        cfg = _check_supported(reader)
        ctx = int(context_length or cfg.max_position_embeddings)
        if not 1 <= ctx <= cfg.max_position_embeddings:
            raise ExportError(f"context_length={ctx} must be in [1, {cfg.max_position_embeddings}]")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            model = make_model(CellmWeightSource(reader), GraphOptions(accuracy_level=accuracy_level, context_length=ctx,
                                                                      int8_residual=int8_residual))
            model.doc_string = f"cellm export of {src.name} (profile {reader.header.get('cellm_profile', '?')})"
            _save_model(model, tmp)
            del model
            tok = _tokenizer_json(src)
            if tok is None:
                raise ExportError(f"no tokenizer next to {src} (expected {src.stem}.tokenizer.json or tokenizer.json)")
            shutil.copyfile(tok, tmp / "tokenizer.json")
            _write_json(tmp / "tokenizer_config.json", make_tokenizer_config(cfg, json.loads(tok.read_text("utf-8")), ctx))
            _write_json(tmp / "genai_config.json", make_genai_config(cfg, ctx, MODEL_FILE))
            _write_json(tmp / CONFIG_FILE, _cellm_config(cfg, reader.header, accuracy_level, ctx, int8_residual))
            notice = src.with_name(src.stem + ".NOTICE")
            if notice.is_file():
                shutil.copyfile(notice, tmp / "NOTICE")
            _publishable_modes(tmp)
            _fsync_dir(tmp)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _publishable_modes(tmp: Path) -> None:
    """mkdtemp makes 0700 and onnx writes 0600: give the folder the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing (forced) folder is swapped out, then removed."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)
