"""Fixed-point encoding of real vectors into Z_(2^32) so that a sum of n never wraps.

A value ``x`` is clipped to ``[-c, c]`` and encoded as ``q = round(x * s)`` in two's
complement modulo 2^32, with the scale

    s = floor((2^31 - 1 - n) / (n * c))         (:func:`scale_for`)

so that ``|q| <= c*s + 1/2`` and the sum of ``n`` encodings satisfies
``|sum q_i| <= n*c*s + n/2 < 2^31``: the modular sum of the masked vectors, read back as a
signed 32-bit integer, is the exact integer sum.

**Error bound** (held by ``tests/test_secagg_quantize.py``). For ``n`` values with
``|x_i| <= c``::

    | dequantize(sum_i quantize(x_i)) - sum_i x_i |  <=  n / (2 s)

because rounding moves each ``x_i * s`` by at most 1/2. A value with ``|x| > c`` is
clipped first (the bound then holds for the clipped values; the organisation logs it).
Integer values times an integer scale are exact: per-row weights, which are lookup counts,
are summed without error.
"""

from __future__ import annotations

import numpy as np

BITS = 32
_HALF = 2 ** (BITS - 1) - 1


def scale_for(clip: float, n: int) -> float:
    """Largest integer scale at which ``n`` values clipped to ``[-clip, clip]`` sum without wrapping.

    Parameters
    ----------
    clip : float
        Largest magnitude of one value, > 0.
    n : int
        Most values in one sum (organisations in the round), >= 1.

    Raises
    ------
    ValueError
        If even a scale of 1 would wrap (``n * clip`` close to 2^31).
    """
    if clip <= 0 or n < 1:
        raise ValueError(f"clip must be > 0 and n >= 1, got clip={clip}, n={n}")
    s = float(np.floor((_HALF - n) / (n * clip)))
    if s < 1:
        raise ValueError(f"{n} values clipped to {clip} cannot be summed in {BITS} bits")
    return s


def error_bound(n: int, scale: float) -> float:
    """Worst-case absolute error of a dequantized sum of ``n`` values: ``n / (2 * scale)``."""
    return n / (2.0 * scale)


def quantize(x: np.ndarray, clip: float, scale: float) -> np.ndarray:
    """Encode ``x`` (clipped to ``[-clip, clip]``) as uint32: ``round(x * scale)`` mod 2^32."""
    q = np.rint(np.clip(np.asarray(x, dtype=np.float64), -clip, clip) * scale).astype(np.int64)
    return q.astype(np.int32).view(np.uint32)


def dequantize(total: np.ndarray, scale: float) -> np.ndarray:
    """Decode a modular sum of :func:`quantize` outputs (uint32) into float64."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / scale


def count_clipped(x: np.ndarray, clip: float) -> int:
    """How many entries of ``x`` fall outside ``[-clip, clip]``."""
    return int(np.count_nonzero(np.abs(x) > clip))
