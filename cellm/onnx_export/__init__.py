"""ONNX export of ``.cellm`` artifacts (MatMulNBits from the stored bits) and the onnxruntime engine.

* :func:`export_onnx` — ``model.onnx`` + external data, ``genai_config.json``, tokenizer files.
* :func:`load_ort_model` — the export run by onnxruntime, implementing the ``CausalLM`` protocol.

onnx / onnxruntime are imported lazily (inside the functions that need them).
"""

from __future__ import annotations

from typing import Any


def export_onnx(*args: Any, **kwargs: Any):
    from cellm.onnx_export.export import export_onnx as _export

    return _export(*args, **kwargs)


def load_ort_model(*args: Any, **kwargs: Any):
    from cellm.onnx_export.engine import load_ort_model as _load

    return _load(*args, **kwargs)


export_onnx.__doc__ = "export_onnx(cellm_path, out_dir, *, accuracy_level=4, force=False, context_length=None, int8_residual=False) -> Path (see export.py)"
load_ort_model.__doc__ = "load_ort_model(dir, threads=None) -> CausalLM running the export with onnxruntime"

__all__ = ["export_onnx", "load_ort_model"]
