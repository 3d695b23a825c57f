"""Scheme registry: scheme name (what profiles reference) -> quantize/dequantize pair.

A scheme has ``.name``, ``.dtype`` (the container dtype of its main tensor), ``.specs(tensor_name,
shape) -> list[TensorSpec]`` (main first, then companions ``<name>.qscale`` / ``<name>.qzero``),
``.quantize(w_f32_2d) -> {suffix: ndarray}`` ("" is the main tensor), ``.dequantize(parts, shape)
-> float32`` and ``.error_bound(w) -> per-row float32 bound`` (a float for 1-D ``f16`` tensors).

Shipped: ``f16``, ``i8``, ``i4`` (cellm v1, bit-exact to upstream), ``q4g{32,64,128}`` (asymmetric
RTN), ``q4g{32,64,128}-sym`` (symmetric RTN) and the 6-bit ``q6g{32,64,128}[-sym]``
(``cellm.quant.groupwise6``). Better quantizers register more names producing the
same dtypes (``register_scheme``). All quantizers are row-local: quantizing row slices separately and
concatenating the parts along axis 0 gives identical bytes (converters may chunk rows / use threads).

``dequantize_parts(dtype, parts, shape)`` dequantizes stored parts by container dtype alone (the
reader uses it; a ``q4g*``/``q6g*`` tensor is symmetric exactly when it has no ``.qzero`` companion).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cellm.errors import FormatError, QuantizationError
from cellm.format.constants import DTYPES, GROUP_SIZES, SCALE_SUFFIX, ZERO_SUFFIX, TensorSpec, is_groupwise
from cellm.quant.groupwise import GroupwiseScheme
from cellm.quant.groupwise6 import Groupwise6Scheme
from cellm.quant.v1 import F16Scheme, RowwiseScheme


class Scheme(Protocol):
    name: str
    dtype: str

    def specs(self, tensor_name: str, shape: tuple[int, ...]) -> list[TensorSpec]: ...

    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]: ...

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray: ...

    def error_bound(self, w: np.ndarray) -> Any: ...


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme, replace: bool = False) -> Scheme:
    """Add a scheme under ``scheme.name``; its ``dtype`` must be a container dtype."""
    if scheme.dtype not in DTYPES:
        raise QuantizationError(
            f"scheme {scheme.name!r} uses unknown dtype {scheme.dtype!r}; known: {', '.join(DTYPES)}"
        )
    if scheme.name in SCHEMES and not replace and SCHEMES[scheme.name] is not scheme:
        raise QuantizationError(f"scheme {scheme.name!r} is already registered")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise QuantizationError(
            f"unknown quantization scheme {name!r}; known: {', '.join(sorted(SCHEMES))}"
        ) from None


register_scheme(F16Scheme())
register_scheme(RowwiseScheme("i8", "i8", 8))
register_scheme(RowwiseScheme("i4", "i4", 4))
for _b in GROUP_SIZES:
    register_scheme(GroupwiseScheme(f"q4g{_b}", f"q4g{_b}", _b, symmetric=False))
    register_scheme(GroupwiseScheme(f"q4g{_b}-sym", f"q4g{_b}", _b, symmetric=True))
    register_scheme(Groupwise6Scheme(f"q6g{_b}", f"q6g{_b}", _b, symmetric=False))
    register_scheme(Groupwise6Scheme(f"q6g{_b}-sym", f"q6g{_b}", _b, symmetric=True))


def scheme_for_dtype(dtype: str, has_zero: bool = False) -> Scheme:
    """The RTN scheme whose storage a tensor of this container dtype uses (for dequantization)."""
    if dtype in ("f16", "i8", "i4"):
        return SCHEMES[dtype]
    if is_groupwise(dtype):
        return SCHEMES[dtype if has_zero else dtype + "-sym"]
    raise FormatError(
        f"dtype {dtype!r} cannot be dequantized on its own; dequantizable: "
        f"{', '.join(d for d in DTYPES if d not in ('u4', 'u8'))}"
    )


def expected_parts(dtype: str, name: str, shape: tuple[int, ...], has_zero: bool = False) -> list[TensorSpec]:
    """The specs (main + companions) a tensor of this dtype must come with."""
    try:
        return scheme_for_dtype(dtype, has_zero).specs(name, tuple(shape))
    except QuantizationError as exc:
        raise FormatError(str(exc)) from exc


def dequantize_parts(dtype: str, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """float32 of the logical ``shape`` from stored parts (``""``, ``.qscale``, ``.qzero``)."""
    return scheme_for_dtype(dtype, ZERO_SUFFIX in parts).dequantize(parts, tuple(shape))


__all__ = [
    "SCHEMES", "Scheme", "register_scheme", "get_scheme", "scheme_for_dtype", "expected_parts",
    "dequantize_parts", "SCALE_SUFFIX", "ZERO_SUFFIX",
]

# Better int4 quantizers (cellm.quant.clip / cellm.quant.gptq): same q4gB storage as RTN.
from cellm.quant.clip import ClipScheme  # noqa: E402
from cellm.quant.gptq import GptqScheme  # noqa: E402

for _b in GROUP_SIZES:
    register_scheme(ClipScheme(f"q4g{_b}-clip", f"q4g{_b}", _b))
    register_scheme(GptqScheme(f"q4g{_b}-gptq", f"q4g{_b}", _b))
    register_scheme(GptqScheme(f"q4g{_b}-gptq-sym", f"q4g{_b}", _b, symmetric=True))
