"""Synthetic federated bag-of-ids data with a controllable touched fraction of the table.

Ids
    Rows of the table are shuffled once (seeded). The first ``H`` shuffled rows are a
    popular head shared by every organisation; the rest form a ring on which organisation
    ``k`` owns a hot range starting at ``k / num_orgs`` of the ring (ranges of neighbouring
    organisations overlap when they are long). Organisation ``k`` draws each id by Zipf
    popularity (exponent ``zipf``, ~1.1) over its own pool of ``P`` ranks: ranks ``0 .. H-1``
    are the shared head (``H = ceil(HEAD_FRACTION * P)``), ranks ``H .. P-1`` its hot range.
    So organisations share their most popular rows and differ in their tails.

Calibration
    ``P`` is chosen (bisection on the exact expected number of distinct draws) so that an
    organisation's TRAIN split touches about ``touch * rows`` distinct rows. The pool is
    capped at ``POOL_FACTOR * touch * rows`` rows; when ``examples_per_org`` is too small to
    touch that many rows even with the largest pool, it is raised to the smallest
    sufficient number (a warning is logged), e.g. ~13,000 examples per organisation for
    ``rows=1_000_000, touch=0.01, bag_size=8``.

Labels
    A hidden ground-truth embedding (dim ``HIDDEN_DIM``) per row; organisation ``k`` has its
    own hidden affine map of the mean embedding of a bag to ``num_classes`` scores, and the
    label is their argmax. Learning the shared table helps every organisation, while heads
    differ.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fedembed.data.bags import Bags, DataError, FederatedData, OrgData, split_indices

log = logging.getLogger(__name__)

HIDDEN_DIM = 8
HEAD_FRACTION = 0.1
POOL_FACTOR = 10
MAX_EXAMPLES_PER_ORG = 5_000_000
TRAIN_FRACTION = 0.7


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.float64) ** -exponent


def expected_distinct(weights: np.ndarray, pool: int, draws: int) -> float:
    """Expected number of distinct ranks in ``draws`` iid draws over the first ``pool`` weights.

    Parameters
    ----------
    weights : np.ndarray
        Unnormalised popularity of ranks (at least ``pool`` of them).
    pool : int
        Number of ranks drawn from (the weights are renormalised over them).
    draws : int
        Number of draws.

    Returns
    -------
    float
        ``sum_r 1 - (1 - p_r) ** draws``.
    """
    w = weights[:pool]
    p = w / w.sum()
    return float(-np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-16))).sum())


def _calibrate_pool(weights: np.ndarray, cap: int, draws: int, target: float) -> int:
    """Smallest pool in [1, cap] whose expected distinct count reaches ``target`` (cap if none)."""
    lo, hi = 1, cap
    if expected_distinct(weights, hi, draws) < target:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if expected_distinct(weights, mid, draws) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _train_size(examples: int) -> int:
    return int(round(TRAIN_FRACTION * examples))


def _calibrate_examples(weights: np.ndarray, cap: int, bag_size: int, examples: int, target: float) -> int:
    """Smallest examples >= ``examples`` whose train split can touch ``target`` rows from ``cap``."""

    def ok(e: int) -> bool:
        return expected_distinct(weights, cap, _train_size(e) * bag_size) >= target

    if ok(examples):
        return examples
    lo, hi = examples, examples
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_EXAMPLES_PER_ORG:
            raise DataError(
                f"touching {target:.0f} rows needs more than {MAX_EXAMPLES_PER_ORG} examples per organisation; "
                "lower touch, or raise rows or bag_size"
            )
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def make_synthetic(
    num_orgs: int = 5,
    rows: int = 100_000,
    touch: float = 0.01,
    seed: int = 0,
    examples_per_org: int = 2000,
    bag_size: int = 8,
    num_classes: int = 4,
    zipf: float = 1.1,
) -> FederatedData:
    """Synthetic organisations over a table of ``rows`` ids (see the module docstring).

    Parameters
    ----------
    num_orgs : int
        Number of organisations.
    rows : int
        Rows of the shared table (``vocab_size``).
    touch : float
        Target fraction of the table that one organisation's train split touches,
        ``0 < touch <= 1`` (met within a few percent in expectation).
    seed : int
        Seed of everything (rows' order, hidden embeddings and labellings, draws, splits).
    examples_per_org : int
        Examples per organisation before the 70/10/20 split; raised automatically when too
        few to reach ``touch``.
    bag_size : int
        Ids per example (drawn with replacement, so a bag may repeat an id).
    num_classes : int
        Classes of every organisation's multi-class target.
    zipf : float
        Exponent of the Zipf popularity of ids.

    Returns
    -------
    FederatedData
        ``vocab_size == rows``, organisations ``org-0 .. org-{num_orgs-1}`` predicting
        ``class``, ``id_names`` None.

    Raises
    ------
    DataError
        An argument is out of range, or ``touch`` cannot be reached.
    """
    if num_orgs < 1 or rows < 1 or bag_size < 1 or examples_per_org < 3 or num_classes < 2:
        raise DataError(
            "need num_orgs >= 1, rows >= 1, bag_size >= 1, examples_per_org >= 3 and num_classes >= 2; got "
            f"num_orgs={num_orgs}, rows={rows}, bag_size={bag_size}, examples_per_org={examples_per_org}, "
            f"num_classes={num_classes}"
        )
    if not 0 < touch <= 1:
        raise DataError(f"touch is a fraction of the table's rows, 0 < touch <= 1; got {touch}")
    if zipf <= 0:
        raise DataError(f"zipf exponent must be positive, got {zipf}")

    target = max(1.0, touch * rows)
    cap = int(min(rows, max(1, math.ceil(POOL_FACTOR * target))))
    weights = _zipf_weights(cap, zipf)
    examples = _calibrate_examples(weights, cap, bag_size, int(examples_per_org), target)
    if examples != examples_per_org:
        log.warning(
            "synthetic: %d examples per organisation cannot touch %.0f of %d rows (touch=%g); using %d examples",
            examples_per_org,
            target,
            rows,
            touch,
            examples,
        )
    draws = _train_size(examples) * bag_size
    pool = _calibrate_pool(weights, cap, draws, target)
    head = min(pool, max(1, math.ceil(HEAD_FRACTION * pool)))
    ring = rows - head
    log.info(
        "synthetic: %d orgs x %d examples, pool %d rows (head %d shared), expected touched %.0f of %d rows",
        num_orgs,
        examples,
        pool,
        head,
        expected_distinct(weights, pool, draws),
        rows,
    )

    seqs = np.random.SeedSequence(int(seed)).spawn(2 + num_orgs)
    order = np.random.default_rng(seqs[0]).permutation(rows).astype(np.int64)
    truth = np.random.default_rng(seqs[1]).standard_normal((rows, HIDDEN_DIM), dtype=np.float32)
    cdf = np.cumsum(weights[:pool])
    cdf /= cdf[-1]
    offsets = np.arange(0, examples * bag_size + 1, bag_size, dtype=np.int64)
    label_names = [f"class-{c}" for c in range(num_classes)]

    orgs = []
    for k in range(num_orgs):
        rng = np.random.default_rng(seqs[2 + k])
        ranks = np.minimum(np.searchsorted(cdf, rng.random(examples * bag_size), side="right"), pool - 1)
        start = (k * ring) // num_orgs
        tail = ranks >= head
        pos = ranks.copy()
        if ring > 0:
            pos[tail] = head + (start + ranks[tail] - head) % ring
        ids = order[pos]
        mean = truth[ids].reshape(examples, bag_size, HIDDEN_DIM).mean(axis=1)
        w = rng.standard_normal((HIDDEN_DIM, num_classes)).astype(np.float32)
        y = np.argmax((mean - mean.mean(axis=0)) @ w, axis=1).astype(np.int64)
        bags = Bags(offsets, ids, y)
        tr, va, te = split_indices(examples, rng)
        orgs.append(
            OrgData(
                f"org-{k}",
                "class",
                "multiclass",
                num_classes,
                list(label_names),
                bags.subset(tr),
                bags.subset(va),
                bags.subset(te),
            )
        )
    return FederatedData(vocab_size=int(rows), orgs=orgs, id_names=None)
