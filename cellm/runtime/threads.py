"""Set the BLAS thread count of numpy's bundled OpenBLAS at run time (no threadpoolctl needed)."""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

_SYMBOLS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")


def _libs() -> list[str]:
    base = os.path.dirname(os.path.dirname(np.__file__))
    return sorted(glob.glob(os.path.join(base, "numpy.libs", "*openblas*.so*")))


def set_blas_threads(n: int | None) -> bool:
    """Best effort: returns True when a BLAS thread setter was found and called."""
    if n is None:
        return False
    if int(n) < 1:
        from cellm.errors import ModelRuntimeError

        raise ModelRuntimeError(f"threads={n} must be >= 1")
    for path in _libs():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _SYMBOLS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(int(n)))
                return True
    return False
