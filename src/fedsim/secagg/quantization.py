"""Client inputs onto the ring Z_(2^32) and their sum back (Bonawitz et al. 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS'17, Sec. 3; Bell et al.
2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS'20, Sec. 5).

A coordinate ``x`` in ``[-r, r]`` becomes the integer ``round((x + r) (2^b - 1) / 2r)`` in
``[0, 2^b - 1]``; a sum of ``n`` such integers stays below ``2^32`` while
``b + ceil(log2 n) <= 32`` (:func:`fits`), so the modular sum of the masked inputs is the
plain integer sum and dequantises to ``step * total - n r``. A coordinate outside ``[-r, r]``
is never clipped unnoticed: :func:`quantize` returns how many there were, and the caller
either clips them (counting them in the round's row) or withholds the input.
"""

from __future__ import annotations

import math

import numpy as np

RING_BITS = 32
"""Masked inputs are uint32 vectors: the same bytes as the float32 update they carry."""


def fits(bits: int, num_inputs: int) -> bool:
    """Whether ``num_inputs`` inputs of ``bits`` bits sum below ``2^32`` (no wrap-around)."""
    return bits + math.ceil(math.log2(max(num_inputs, 1))) <= RING_BITS


def out_of_range(x: np.ndarray, value_range: float) -> int:
    """How many coordinates of ``x`` lie outside ``[-value_range, value_range]``."""
    return int(np.count_nonzero(np.abs(x) > value_range))


def quantize(x: np.ndarray, value_range: float, bits: int) -> np.ndarray:
    """``x`` (clipped to ``[-r, r]``) as uint32 levels in ``[0, 2^bits - 1]``, round to nearest."""
    levels = 2**bits - 1
    clipped = np.clip(np.asarray(x, dtype=np.float64), -value_range, value_range)
    return np.rint((clipped + value_range) * (levels / (2 * value_range))).astype(np.uint32)


def dequantize_sum(total: np.ndarray, num_inputs: int, value_range: float, bits: int) -> np.ndarray:
    """The float64 sum of ``num_inputs`` inputs whose quantised levels sum to ``total``."""
    if not fits(bits, num_inputs):
        raise ValueError(f"{num_inputs} inputs of {bits} bits can wrap around 2^{RING_BITS}")
    step = 2 * value_range / (2**bits - 1)
    return total.astype(np.float64) * step - num_inputs * value_range
