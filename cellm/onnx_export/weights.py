"""Stored ``.cellm`` bits -> onnxruntime initializers, never re-quantized from float.

Every quantized dtype maps onto ``com.microsoft.MatMulNBits`` inputs (``B`` uint8
``[N, ceil(K/bs), bs*bits/8]``, ``scales`` float32 ``[N, nb]``, optional packed uint8
``zero_points``) whose dequantized values ``(q - zp) * scale`` are bit-for-bit the values
``CellmReader.dequantize`` returns:

==========  =========================================================================================
dtype       mapping
==========  =========================================================================================
q4gB        bits=4, block_size=B: main storage IS ``B``; f16 ``.qscale`` -> f32 scales (exact);
            ``.qzero`` (packed u4, low nibble first) IS the packed ``zero_points``; absent -> the
            input is omitted (MatMulNBits' default zero point 8 = the symmetric zero point).
q6gB        bits=8, block_size=B (onnxruntime has no 6-bit MatMulNBits): the 6-bit codes unpacked to one
            byte each; ``.qzero`` (u8, one zero point per block) IS the 8-bit ``zero_points``;
            symmetric (no ``.qzero``): codes + 96 with the input omitted (default zero point 128),
            so ``(q6 + 96 - 128) = (q6 - 32)``. Twice the bytes of ``q4g`` on disk, same values.
i4          per-row symmetric, nibble q+8 low-first: bits=4, rows split into blocks of
            ``rowwise_block(K)``; the row's f16 scale (as f32) repeated in every block; zero point 8
            (input omitted). When the block boundaries are byte aligned the packed rows are reshaped
            as they are; otherwise rows are unpacked and re-packed (same codes, padding nibble 8).
i8          per-row symmetric int8: bits=8, ``q + 128`` as uint8 (= the bit pattern ``q ^ 0x80``),
            zero point 128 (input omitted), same block split / repeated scale as i4.
f16         a float tensor; the graph computes in float32 (see graph.py).
==========  =========================================================================================

f16 scales widen to f32 exactly, the codes are the stored codes, so ``(q - zp) * f32(s16)`` is the
same float32 product the reader computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellm.errors import ExportError

SCALE = ".qscale"
ZERO = ".qzero"
MIN_BLOCK = 16  # MatMulNBits: block_size is a power of two >= 16
MAX_ROW_BLOCK = 128  # per-row schemes: largest block used to split a row (fast MLAS paths <= 256)
FLOAT_DTYPES = ("f16", "f32", "bf16")
QUANT_DTYPES = ("i8", "i4", "q4g32", "q4g64", "q4g128", "q6g32", "q6g64", "q6g128")


@dataclasses.dataclass(frozen=True)
class NBits:
    """The inputs and attributes of one MatMulNBits weight (logical weight [N, K])."""

    n: int
    k: int
    bits: int
    block_size: int
    b: np.ndarray  # uint8 [N, nb, block_size*bits/8]
    scales: np.ndarray  # float32 [N, nb]
    zero_points: np.ndarray | None  # uint8 [N, ceil(nb*bits/8)] packed, None = 2^(bits-1)

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def nbytes(self) -> int:
        z = 0 if self.zero_points is None else self.zero_points.nbytes
        return int(self.b.nbytes + self.scales.nbytes + z)


def rowwise_block(k: int) -> int:
    """Block size used to split a per-row quantized row of length ``k``.

    The largest power of two in [16, 128] dividing ``k`` (fewest repeated scales, no padding); when
    none divides (``k`` not a multiple of 16) 32 with a zero-padded last block.
    """
    for b in (128, 64, 32, 16):
        if b <= MAX_ROW_BLOCK and k % b == 0:
            return b
    return 32


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    np.right_shift(packed, 4, out=out[..., 1::2])
    return out[..., :n]


def _pack4(codes: np.ndarray) -> np.ndarray:
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    return (lo & 0x0F) | (hi << 4)


def _check_2d(name: str, dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ExportError(f"tensor {name!r} ({dtype}) must be 2-D to become MatMulNBits, got shape {list(shape)}")
    return int(shape[0]), int(shape[1])


def nbits_from_storage(name: str, dtype: str, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> NBits:
    """MatMulNBits inputs for a stored quantized tensor (``parts`` = ``CellmReader.scheme_parts``)."""
    n, k = _check_2d(name, dtype, shape)
    main = np.asarray(parts[""])
    if dtype.startswith("q4g"):
        try:
            bs = int(dtype[3:])
        except ValueError:
            raise ExportError(f"tensor {name!r}: unknown group-wise dtype {dtype!r}") from None
        nb = -(-k // bs)
        b = np.ascontiguousarray(main.view(np.uint8).reshape(n, nb, bs // 2))
        s = np.asarray(parts[SCALE]).astype(np.float32).reshape(n, nb)
        z = parts.get(ZERO)
        zp = None if z is None else np.ascontiguousarray(np.asarray(z).view(np.uint8).reshape(n, (nb + 1) // 2))
        return NBits(n, k, 4, bs, b, s, zp)
    if dtype.startswith("q6g") and dtype in QUANT_DTYPES:
        from cellm.quant.bitpack import unpack_sextets

        bs = int(dtype[3:])
        nb = -(-k // bs)
        codes = unpack_sextets(main.view(np.uint8).reshape(n, nb, bs * 3 // 4), bs)
        s = np.asarray(parts[SCALE]).astype(np.float32).reshape(n, nb)
        z = parts.get(ZERO)
        if z is None:
            return NBits(n, k, 8, bs, np.ascontiguousarray(codes + np.uint8(96)), s, None)
        zp = np.ascontiguousarray(np.asarray(z).view(np.uint8).reshape(n, nb))
        return NBits(n, k, 8, bs, np.ascontiguousarray(codes), s, zp)
    if dtype in ("i4", "i8"):
        bits = 4 if dtype == "i4" else 8
        bs = rowwise_block(k)
        nb = -(-k // bs)
        s16 = np.asarray(parts[SCALE]).reshape(n)
        scales = np.repeat(s16.astype(np.float32)[:, None], nb, axis=1)
        if bits == 8:
            u = main.view(np.uint8).reshape(n, k) ^ np.uint8(0x80)  # int8 q -> uint8 q + 128
            if nb * bs != k:
                p = np.full((n, nb * bs), 128, dtype=np.uint8)
                p[:, :k] = u
                u = p
            return NBits(n, k, 8, bs, np.ascontiguousarray(u.reshape(n, nb, bs)), scales, None)
        packed = main.view(np.uint8).reshape(n, (k + 1) // 2)
        if nb * bs == k:  # every block starts on a byte: the packed row is already MatMulNBits' B
            b = np.ascontiguousarray(packed.reshape(n, nb, bs // 2))
        else:
            codes = np.full((n, nb * bs), 8, dtype=np.uint8)
            codes[:, :k] = _unpack4(packed, k)
            b = np.ascontiguousarray(_pack4(codes).reshape(n, nb, bs // 2))
        return NBits(n, k, 4, bs, b, scales, None)
    raise ExportError(
        f"tensor {name!r} has dtype {dtype!r} which the ONNX exporter cannot map; "
        f"supported: {', '.join(FLOAT_DTYPES + QUANT_DTYPES)}"
    )


def dequantize_nbits(w: NBits) -> np.ndarray:
    """float32 [N, K] = (q - zp) * scale, exactly as MatMulNBits defines it (used by the tests)."""
    nb, bs = w.n_blocks, w.block_size
    if w.bits == 4:
        q = _unpack4(w.b.reshape(w.n, nb, bs // 2), bs).astype(np.float32)
        zp = (np.full((w.n, nb), 8, np.uint8) if w.zero_points is None
              else _unpack4(w.zero_points, nb))
    else:
        q = w.b.reshape(w.n, nb, bs).astype(np.float32)
        zp = np.full((w.n, nb), 128, np.uint8) if w.zero_points is None else w.zero_points[:, :nb]
    q -= zp.astype(np.float32)[:, :, None]
    q *= w.scales[:, :, None]
    return np.ascontiguousarray(q.reshape(w.n, nb * bs)[:, : w.k])


def float_from_storage(name: str, dtype: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    """A stored float tensor as float16 (f16 storage kept as is) or float32 (f32/bf16)."""
    main = np.asarray(parts[""])
    if dtype == "f16":
        return main.view(np.float16)
    if dtype == "f32":
        return main.view(np.float32)
    if dtype == "bf16":
        return (main.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ExportError(f"tensor {name!r}: dtype {dtype!r} is not a float dtype")
