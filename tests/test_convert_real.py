"""The real Gemma-3 270M converted with every shipped profile: valid, numerically within each
scheme's bound versus the source weights, sizes as the upstream notes give them."""

from __future__ import annotations

import pytest
from real_artifacts import PROFILES, real_cellm  # noqa: F401  (session fixture)

from cellm.format import CellmReader
from cellm.validate import validate

MB = 1_000_000
# expected sizes (notes: int8-v1 ~436 MB, mixed-int4-v1 ~430 MB, int4-v1 ~134 MB) +- 2%
SIZES = {"int8-v1": 436 * MB, "mixed-int4-v1": 430 * MB, "int4-v1": 134.9 * MB,
         "mixed-int4": 435.6 * MB, "f16": 536.2 * MB,
         "mixed-int4-gemma3": 227.6 * MB, "mixed-int4-gemma3-270m": 239.7 * MB}


@pytest.mark.real
@pytest.mark.parametrize("profile", PROFILES)
def test_real_convert_validates_with_source(real_cellm, real_ckpt, profile):
    path = real_cellm[profile]
    size = path.stat().st_size
    assert abs(size - SIZES[profile]) < 0.02 * SIZES[profile], size
    rep = validate(path, source=str(real_ckpt))
    assert rep.ok, [str(p) for p in rep.problems[:5]]
    assert rep.checked["numerics"] == 18 * 13 + 2  # every weight compared to the source
    with CellmReader(path) as r:
        h = r.header
        assert h["rope_theta"] == 1e6 and h["vocab_size"] == 262144 and h["num_layers"] == 18
        assert "lm_head.weight" not in r.tensors  # tied
        assert h["cellm_profile"]["name"] == profile
    assert path.with_name(path.stem + ".tokenizer.json").is_file()
    notice = path.with_name(path.stem + ".NOTICE").read_text()
    assert "Gemma Terms of Use" in notice
