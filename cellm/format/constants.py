"""`.cellm` v1 container constants, the dtype table and the tensor descriptors.

Header ``shape`` is always the LOGICAL element shape (what ``dequantize`` returns). How many bytes a
tensor occupies and the shape of its storage view follow from the dtype (see ``DTYPES``):

=========  ==========  =======================================  ==============================
dtype      extension   storage (numpy dtype, shape)             nbytes
=========  ==========  =======================================  ==============================
f16        no          float16 ``shape``                        2 * prod(shape)
i8         no          int8 ``shape``                           prod(shape)
i4         no          uint8 ``[*lead, ceil(cols/2)]``          prod(lead) * ceil(cols/2)
q4gB       yes         uint8 ``[N, ceil(K/B), B/2]``            N * ceil(K/B) * B/2
q6gB       yes         uint8 ``[N, ceil(K/B), 3*B/4]``          N * ceil(K/B) * 3*B/4
u4         yes         uint8 ``[*lead, ceil(cols/2)]``          prod(lead) * ceil(cols/2)
u8         yes         uint8 ``shape``                          prod(shape)
=========  ==========  =======================================  ==============================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from cellm.errors import FormatError

MAGIC = b"CELLM"
VERSION = 1
ALIGNMENT = 64
PREFIX_LEN = len(MAGIC) + 1 + 4  # magic, u8 version, u32 LE header length
MIN_FILE_SIZE = PREFIX_LEN
MAX_HEADER_LEN = 256 * 1024 * 1024  # 256 MiB; real headers are a few hundred KiB
MAX_NDIM = 8
MAX_DIM = 1 << 40

REQUIRED_HEADER_KEYS: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "vocab_size": (int,),
    "hidden_dim": (int,),
    "intermediate_size": (int,),
    "num_layers": (int,),
    "num_heads": (int,),
    "num_kv_heads": (int,),
    "rms_norm_eps": (int, float),
    "rope_theta": (int, float),
    "tensors": (list,),
}

# Optional upstream keys and the type upstream's serde struct gives them (null is always allowed).
UPSTREAM_OPTIONAL_KEYS: dict[str, str] = {
    "source_model_type": "str",
    "source_safetensors_format": "str",
    "text_tensor_prefix": "str",
    "vision_tensor_prefix": "str",
    "projector_tensor_prefix": "str",
    "head_dim": "usize",
    "bos_token_id": "u32",
    "eos_token_id": "u32",
    "max_position_embeddings": "usize",
    "tie_word_embeddings": "bool",
    "source_torch_dtype": "str",
    "source_architectures": "list[str]",
    "source_quantization": "any",
    "source_quantization_config": "any",
    "source_text_config": "any",
    "source_vision_config": "any",
    "source_projector_config": "any",
}

SCALE_SUFFIX = ".qscale"
ZERO_SUFFIX = ".qzero"
COMPANION_SUFFIXES = (SCALE_SUFFIX, ZERO_SUFFIX)


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the writer needs before any data exists: name, dtype, logical shape, byte size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One ``tensors[]`` entry of a parsed header (``offset`` is absolute from the file start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclasses.dataclass(frozen=True)
class DType:
    """A container dtype: storage numpy dtype and how logical shape maps to storage shape."""

    name: str
    storage: np.dtype
    is_extension: bool
    storage_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    min_ndim: int = 0
    max_ndim: int = MAX_NDIM
    block: int = 0  # group size for group-wise dtypes (q4gB / q6gB)
    bits: int = 0  # code width of group-wise dtypes (4 / 6)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(self.storage_shape(shape)) * self.storage.itemsize

    def check_shape(self, shape: tuple[int, ...], what: str = "tensor") -> None:
        if not (self.min_ndim <= len(shape) <= self.max_ndim):
            raise FormatError(
                f"{what}: dtype {self.name} needs {self.min_ndim}..{self.max_ndim} dimensions, "
                f"got shape {list(shape)}"
            )


def _same(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape)


def _nibbles(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-1]) + ((shape[-1] + 1) // 2,)


def _blocks(block: int, bits: int = 4) -> Callable[[tuple[int, ...]], tuple[int, ...]]:
    def storage_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        n, k = shape
        return (n, (k + block - 1) // block, block * bits // 8)

    return storage_shape


GROUP_SIZES = (32, 64, 128)

DTYPES: dict[str, DType] = {
    "f16": DType("f16", np.dtype("<f2"), False, _same),
    "i8": DType("i8", np.dtype("i1"), False, _same),
    "i4": DType("i4", np.dtype("u1"), False, _nibbles, min_ndim=1),
    "u4": DType("u4", np.dtype("u1"), True, _nibbles, min_ndim=1),
    "u8": DType("u8", np.dtype("u1"), True, _same, min_ndim=1),
}
GROUPWISE_BITS = {"q4g": 4, "q6g": 6}  # dtype prefix -> code width
ZERO_DTYPE = {4: "u4", 6: "u8"}  # code width -> dtype of the optional ``.qzero`` companion
for _p, _bits in GROUPWISE_BITS.items():
    for _b in GROUP_SIZES:
        DTYPES[f"{_p}{_b}"] = DType(f"{_p}{_b}", np.dtype("u1"), True, _blocks(_b, _bits), 2, 2,
                                    block=_b, bits=_bits)
COMPANION_DTYPES = ("u4", "u8")  # zero-point storage: never a tensor of its own


def is_groupwise(dtype: str) -> bool:
    """True for the group-wise dtypes (``q4gB``, ``q6gB``): [N, K] with per-block scale/zero point."""
    d = DTYPES.get(dtype)
    return d is not None and d.bits > 0

V1_DTYPES = tuple(n for n, d in DTYPES.items() if not d.is_extension)
EXTENSION_DTYPES = tuple(n for n, d in DTYPES.items() if d.is_extension)


def get_dtype(name: str, tensor: str | None = None) -> DType:
    """The dtype entry, or FormatError naming the dtype (and tensor) and the supported list."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        where = f" of tensor {tensor!r}" if tensor else ""
        raise FormatError(
            f"unsupported dtype {name!r}{where}; supported: {', '.join(DTYPES)}"
        ) from None


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int], tensor: str | None = None) -> int:
    """Byte size of a tensor of this dtype and logical shape (FormatError on a bad dtype/shape)."""
    dt = get_dtype(dtype, tensor)
    shp = tuple(int(s) for s in shape)
    dt.check_shape(shp, repr(tensor) if tensor else "tensor")
    if any(s < 0 for s in shp):
        raise FormatError(f"tensor {tensor!r}: negative dimension in shape {list(shp)}")
    return dt.nbytes(shp)


def make_spec(name: str, dtype: str, shape: tuple[int, ...] | list[int]) -> TensorSpec:
    shp = tuple(int(s) for s in shape)
    return TensorSpec(name, dtype, shp, tensor_nbytes(dtype, shp, name))
