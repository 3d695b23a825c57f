"""Quantization schemes (``cellm.quant.schemes`` registry) and 4-bit packing (``bitpack``)."""

from cellm.quant.schemes import SCHEMES, Scheme, dequantize_parts, get_scheme, register_scheme

__all__ = ["SCHEMES", "Scheme", "dequantize_parts", "get_scheme", "register_scheme"]
