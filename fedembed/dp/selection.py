"""Row selection under DP: noisy per-row contribution counts, thresholded, without a dense noise vector.

DP-AdaFEST (Ghazi et al., NeurIPS 2023) releases, each step, the per-row contribution
counts of the sampled examples plus Gaussian noise, and keeps only the rows whose noisy
count reaches a threshold ``tau``; only those rows' gradients are released (noised), the
others are dropped. Each example's contribution vector (one entry per distinct row it
looks up, over all tables) is scaled to L2 norm at most ``count_clip``, so the count
vector's L2 sensitivity is ``count_clip`` and the noise standard deviation is
``selection_noise_multiplier x count_clip``.

Done literally, that is one Gaussian per row of every table per step. :func:`select_rows`
draws the same distribution at the cost of the touched rows: rows with a zero count are
all alike, so how many of them cross the threshold is ``Binomial(untouched, p)`` with
``p = P(N(0, s^2) >= tau)``, which ones is a uniform subset of the untouched rows, and
their noisy counts are independent draws of ``N(0, s^2)`` conditioned on ``>= tau``. Those
false positives must be released too (with a pure-noise gradient): leaving them out would
tell which rows were touched.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.special import ndtri

from fedembed.dp import DPError
from fedembed.dp.noise import DPRandom

log = logging.getLogger(__name__)


def example_count_scale(pairs_per_example: np.ndarray, count_clip: float) -> np.ndarray:
    """Per example, the value of each entry of its contribution vector: ``min(1, count_clip / sqrt(k))``.

    Parameters
    ----------
    pairs_per_example : np.ndarray
        ``k``: distinct (table, row) pairs each example looks up, shape ``(B,)``.
    count_clip : float
        L2 bound of one example's contribution vector.

    Returns
    -------
    np.ndarray
        float64 ``(B,)``; an example with ``k`` rows contributes this to each of them, so its
        contribution vector has L2 norm ``<= count_clip``.
    """
    if not count_clip > 0:
        raise DPError(f"count_clip must be > 0, got {count_clip}")
    k = np.asarray(pairs_per_example, dtype=np.float64)
    return np.minimum(1.0, count_clip / np.sqrt(np.maximum(k, 1.0)))


def tail_probability(threshold: float, std: float) -> float:
    """``P(N(0, std^2) >= threshold)``."""
    return 0.5 * math.erfc(threshold / (std * math.sqrt(2.0)))


def select_rows(
    touched: np.ndarray,
    counts: np.ndarray,
    num_rows: int,
    std: float,
    threshold: float,
    rng: DPRandom,
    exclude: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one table whose noisy contribution count reaches ``threshold``.

    Distributed exactly as adding ``N(0, std^2)`` to the count of every row of the table
    (zero for the untouched ones) and thresholding, at a cost linear in the touched and
    selected rows (see the module docstring).

    Parameters
    ----------
    touched : np.ndarray
        Sorted unique ids of the rows with a positive count, int64.
    counts : np.ndarray
        Their (clipped, summed) contribution counts, float64, same length.
    num_rows : int
        Rows of the table.
    std : float
        Noise standard deviation (> 0): selection noise multiplier x count clip.
    threshold : float
        Keep rows whose noisy count is ``>= threshold`` (> 0).
    rng : SecureRandom or np.random.Generator
        Source of the noise (the organisation's secret stream, :mod:`fedembed.dp.noise`).
    exclude : int, optional
        A row never selected (the table's padding row: it never has a gradient, and that is public).

    Returns
    -------
    ids : np.ndarray
        Sorted unique selected row ids, int64.
    noisy_counts : np.ndarray
        Their noisy counts (all ``>= threshold``), float64.
    """
    if not std > 0 or not threshold > 0:
        raise DPError(f"selection needs std > 0 and threshold > 0, got {std}, {threshold}")
    touched = np.asarray(touched, dtype=np.int64)
    if exclude is not None:
        keep = touched != exclude
        touched, counts = touched[keep], np.asarray(counts)[keep]
    noisy = np.asarray(counts, dtype=np.float64) + rng.normal(0.0, std, size=touched.shape[0])
    hit = noisy >= threshold
    ids, values = touched[hit], noisy[hit]

    untouched = num_rows - touched.shape[0] - (1 if exclude is not None and 0 <= exclude < num_rows else 0)
    p = tail_probability(threshold, std)
    m = int(rng.binomial(untouched, p)) if untouched > 0 else 0
    if m:
        extra = _uniform_untouched(touched, num_rows, m, rng, exclude)
        # N(0, std^2) conditioned on >= threshold, by inversion on the upper tail (precise for tiny p)
        u = rng.random(m)
        tail = -std * ndtri(np.maximum(p * u, np.finfo(np.float64).tiny))
        ids = np.concatenate([ids, extra])
        values = np.concatenate([values, np.maximum(tail, threshold)])
    order = np.argsort(ids, kind="stable")
    return ids[order], values[order]


def _uniform_untouched(
    touched: np.ndarray, num_rows: int, m: int, rng: DPRandom, exclude: int | None
) -> np.ndarray:
    """``m`` distinct rows drawn uniformly from the rows not in ``touched`` (nor ``exclude``)."""
    banned = set(touched.tolist())
    if exclude is not None:
        banned.add(int(exclude))
    free = num_rows - len(banned)
    if m > free:
        raise DPError(f"cannot draw {m} rows from {free} untouched ones")
    if 4 * m > free:  # a dense draw is cheaper than rejection here (an index array, never a noise vector)
        pool = np.setdiff1d(np.arange(num_rows, dtype=np.int64), np.fromiter(banned, np.int64, len(banned)))
        return rng.choice(pool, size=m, replace=False)
    out: list[int] = []
    chosen: set[int] = set()
    while len(out) < m:
        for r in rng.integers(0, num_rows, size=2 * (m - len(out)) + 8).tolist():
            if r not in banned and r not in chosen:
                chosen.add(r)
                out.append(r)
                if len(out) == m:
                    break
    return np.asarray(out, dtype=np.int64)
