"""The `.cellm` v1 container: constants and dtype table, streaming writer, mmap reader."""

from cellm.format.constants import (
    ALIGNMENT,
    DTYPES,
    EXTENSION_DTYPES,
    MAGIC,
    MAX_HEADER_LEN,
    SCALE_SUFFIX,
    V1_DTYPES,
    VERSION,
    ZERO_SUFFIX,
    TensorInfo,
    TensorSpec,
    make_spec,
    tensor_nbytes,
)
from cellm.format.reader import CellmReader, open_cellm
from cellm.format.writer import CellmWriter, header_from_config, write_cellm

__all__ = [
    "ALIGNMENT", "DTYPES", "EXTENSION_DTYPES", "MAGIC", "MAX_HEADER_LEN", "SCALE_SUFFIX", "V1_DTYPES",
    "VERSION", "ZERO_SUFFIX", "TensorInfo", "TensorSpec", "make_spec", "tensor_nbytes", "CellmReader",
    "open_cellm", "CellmWriter", "header_from_config", "write_cellm",
]
