"""Calibration-aware schemes through the ordinary converter: a profile naming q4g32-gptq converts
(the converter computes and caches the calibration statistics), the file reads back as plain q4g32
storage, and the bytes equal a direct GPTQ quantization with the same statistics."""

from __future__ import annotations

import numpy as np

from cellm.format.reader import CellmReader
from cellm.quant.schemes import get_scheme

PROFILE = """
name = "gptq-test"
gate_class = "int4"

[[rules]]
pattern = 'model\\.layers\\.\\d+\\.mlp\\..*\\.weight'
ndim = 2
scheme = "q4g32-gptq"

[[rules]]
pattern = 'model\\.embed_tokens\\.weight'
ndim = 2
scheme = "i8"

[[rules]]
pattern = '.*'
scheme = "f16"
"""


def test_convert_with_gptq_profile(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLM_CACHE", str(tmp_path / "cache"))
    from cellm.convert import convert
    from cellm.quality.calibration import calibration_stats
    from cellm.sources import open_source

    prof = tmp_path / "p.toml"
    prof.write_text(PROFILE)
    src = open_source(str(tiny_ckpt))
    res = convert(src, prof, tmp_path / "out.cellm")
    assert list((tmp_path / "cache" / "quality").glob("*/calib-*.npz")), "calibration stats not cached"
    stats = calibration_stats(src)
    name = "model.layers.1.mlp.down_proj.weight"
    with CellmReader(res.path) as r:
        assert r.tensors[name].dtype == "q4g32"
        assert r.header["cellm_schemes"][name] == "q4g32-gptq"
        parts = r.scheme_parts(name)
        direct = get_scheme("q4g32-gptq").quantize(src.load(name), hessian=stats.hessian(name))
        for k, v in direct.items():
            assert np.asarray(parts[k]).tobytes() == v.tobytes()
        dq = r.dequantize(name)
        assert dq.shape == tuple(src.shape(name))
        assert r.tensors["model.embed_tokens.weight"].dtype == "i8"
