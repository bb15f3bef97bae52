"""Flower arrays as numpy arrays and tensors, without a parse per array.

A Flower ``Array`` holds its values as the bytes of an ``.npy`` file (``np.save``).
``Array.numpy()`` reads them back with ``np.load``, which parses the file's header with
``ast.literal_eval`` (about 0.15 ms an array), and ``Array(ndarray)`` formats that header
anew for every array. A simulated client's message carries a few arrays each way, so at
hundreds of clients a round these costs exceed the clients' training. The header says
nothing the ``Array`` does not carry in its ``dtype`` and ``shape`` fields: :func:`to_numpy`
checks the header's length and order and reads the values in place, zero-copy, and
:func:`from_numpy` writes the bytes ``np.save`` writes with a header made once per dtype
and shape. Written by hand because neither numpy nor Flower offers either.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NPY_MAGIC = b"\x93NUMPY"


def to_numpy(array: Array) -> np.ndarray:
    """The values of ``array`` (what ``array.numpy()`` returns), as a read-only view.

    Raises ``ValueError`` for data that is not a version 1 ``.npy`` buffer of the array's
    dtype and shape.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != NPY_MAGIC or data[6:8] != b"\x01\x00":
        raise ValueError(f"array of stype {array.stype!r} is not a version 1 .npy buffer")
    offset = 10 + int.from_bytes(data[8:10], "little")
    dtype = np.dtype(array.dtype)
    count = math.prod(array.shape)
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f"array data holds {len(data) - offset} bytes, not {count} values of {dtype}")
    fortran = b"'fortran_order': True" in data[10:offset]
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(array.shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def from_numpy(values: np.ndarray) -> Array:
    """``Array(values)``: the same ``dtype``, ``shape`` and ``.npy`` bytes."""
    values = values if values.flags.c_contiguous else values.copy(order="C")
    header = _npy_header(values.dtype.str, values.shape)
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray",
                 data=header + values.tobytes())


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of named numpy arrays (see :func:`from_numpy`)."""
    return ArrayRecord({name: from_numpy(values) for name, values in arrays.items()})


def to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, read with :func:`to_numpy` (the tensors own their memory)."""
    return {name: torch.from_numpy(to_numpy(array).copy()) for name, array in record.items()}
