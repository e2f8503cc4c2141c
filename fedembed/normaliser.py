"""The pooled normaliser: each organisation's table steps re-scaled by the federation's Adam normaliser.

Every organisation steps the shared rows with its own Adam, which divides its gradients
of a row by *its own* running scale of them. Centralised training (``pooled``) divides
everyone's gradients of the row by *their joint* scale. Where organisations see a row very
differently (one has already fitted it, another has not), each still moves it a full
Adam step and the sum adds those steps up: the gap to ``pooled`` on tasks like
``examples/links.py`` (README, "Where the link gap comes from").

For every table :meth:`fedembed.recipe.TrainConfig.pooled_tables` names (by default the
tables of at most ``pooled_normaliser_rows`` = 1,000 rows; all with ``pooled_normaliser``),
each organisation also counts, per row it touched,
its steps on the row ``c`` and the sum of its squared gradients ``S`` (per coordinate),
and puts its own normaliser of the row in its upload,

``v_k = (S + tau * m) / (c + tau) / mean(m)``,

shrunk toward its own mean squared gradient per row-step ``m`` (per coordinate, over the
rows it touched; ``tau`` = :data:`PRIOR`) and divided by that mean's mean over
coordinates, so that ``v_k`` has no unit and every bound below is fixed in advance. The
coordinator then moves the row by ``sum_k w_k delta_k sqrt(v_k / v)``, with
``v = sum_k w_k v_k / sum_k w_k`` the federation's normaliser of the row, in place of
``sum_k w_k delta_k``: each organisation's step re-scaled from its own normaliser to the
federation's. A row one organisation touched moves by its delta, as before.

Everything this needs is linear in the organisations' uploads, so plain and secure sums
carry it alike, in the same fixed point: an organisation's upload of a table of width
``dim`` is ``2 dim`` wide (:func:`upload_shapes`), its left half ``delta sqrt(v_k / V)``
and its right half ``clip v_k / V`` (:func:`widen`), both within ``[-clip, clip]`` like
a delta (``clip`` is the round's ``delta_clip``, ``V`` = :data:`CLIP`), and the sums
are turned back into the step by :func:`narrow`.

What the coordinator learns beyond the sum of deltas: the sum of the organisations'
normalisers of every row (of one organisation's, where it alone touched the row, next to
its delta, which it learns there already). An organisation that lies about its normaliser
can sink the federation's ``v`` of a row and so scale every honest delta of the row up:
:func:`narrow` bounds the step of every coordinate by ``clip * sum w``, the most that
honest deltas can add up to without the normaliser. Inside the range nothing can be
checked: an organisation that claims :data:`CLIP` on a row the others see as average
weights its own delta by ``sqrt(CLIP n / (CLIP + n - 1)) < sqrt(n)`` and theirs down.
"""

from __future__ import annotations

import logging
from typing import Collection, Mapping

import numpy as np

from fedembed.secagg.quantize import count_clipped
from fedembed.sparse import AggregateSum, RowUpdate, TableSum, UpdateError

log = logging.getLogger(__name__)

PRIOR = 10.0
"""Steps' worth of the organisation's own mean squared gradient a row's normaliser is shrunk toward."""

CLIP = 100.0
"""Largest normaliser sent, in units of the organisation's own mean (larger ones are clipped, and counted)."""

FLOOR = 1e-6
"""Smallest federation normaliser a step is divided by, in the same units (guards a sum driven to 0)."""


def upload_shapes(shapes: Mapping[str, tuple[int, int]], pooled: Collection[str]) -> dict[str, tuple[int, int]]:
    """``(rows, width)`` of every table's upload: ``dim``, or ``2 dim`` for a table under the pooled normaliser.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, int]]
        ``(rows, dim)`` of every shared table.
    pooled : Collection[str]
        The tables that carry the normaliser (``TrainConfig.pooled_tables``).

    Returns
    -------
    dict[str, tuple[int, int]]
        What an upload (plain or secure) is laid out and checked against.
    """
    return {n: (int(r), 2 * int(d) if n in pooled else int(d)) for n, (r, d) in shapes.items()}


def own_normaliser(sq: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, int]:
    """An organisation's normaliser of every row it touched, shrunk to its own mean, in units of that mean.

    Parameters
    ----------
    sq : np.ndarray
        ``(rows, dim)``: per row it touched, the sum over its steps on the row of the squared gradient.
    steps : np.ndarray
        ``(rows,)``: its steps on each row (at least 1 for a row it touched).

    Returns
    -------
    v : np.ndarray
        ``(rows, dim)`` float64 in ``[0, CLIP]``: ``(sq + PRIOR m) / (steps + PRIOR) / mean(m)``,
        ``m = sum(sq) / sum(steps)`` per coordinate; all ones where it has no gradient at all.
    clipped : int
        Entries above :data:`CLIP`, clipped to it.
    """
    sq = np.asarray(sq, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    if sq.ndim != 2 or steps.shape != (sq.shape[0],):
        raise ValueError(f"squared-gradient sums {sq.shape} and step counts {steps.shape} do not match")
    if not (np.all(np.isfinite(sq)) and np.all(sq >= 0) and np.all(steps >= 0)):
        raise ValueError("squared-gradient sums and step counts must be finite and >= 0")
    m = sq.sum(axis=0) / max(float(steps.sum()), 1.0)
    unit = float(m.mean()) if m.size else 0.0
    if not unit > 0:  # no gradient at all (or no rows): every step keeps its own size
        return np.ones_like(sq), 0
    v = (sq + PRIOR * m) / (steps + PRIOR)[:, None] / unit
    clipped = int(np.count_nonzero(v > CLIP))
    return np.minimum(v, CLIP), clipped


def widen(delta: np.ndarray, v: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """An organisation's upload of one table under the pooled normaliser: ``[delta sqrt(v/CLIP), clip v/CLIP]``.

    Parameters
    ----------
    delta : np.ndarray
        ``(rows, dim)``: its deltas of the rows it touched (clipped to ``clip`` here, as
        the sum would clip them).
    v : np.ndarray
        ``(rows, dim)``: its normaliser of those rows (:func:`own_normaliser`), in ``[0, CLIP]``.
    clip : float
        The round's ``delta_clip``.

    Returns
    -------
    wide : np.ndarray
        ``(rows, 2 dim)`` float32, every entry within ``[-clip, clip]``.
    clipped : int
        Entries of ``delta`` beyond ``clip``, clipped here (the sum finds none left to clip).
    """
    if delta.shape != v.shape:
        raise ValueError(f"deltas {delta.shape} and normalisers {v.shape} do not match")
    if not clip > 0:
        raise ValueError(f"delta clip must be > 0, got {clip}")
    r = np.clip(np.asarray(v, dtype=np.float64), 0.0, CLIP) / CLIP
    d = np.asarray(delta, dtype=np.float64)
    clipped = count_clipped(d, clip)
    d = np.clip(d, -clip, clip)
    return np.concatenate([d * np.sqrt(r), clip * r], axis=1).astype(np.float32), clipped


FLOAT16_QUANTUM = 2.0 ** -24
"""The float16 wire's smallest step (its subnormal spacing): the absolute rounding spared below."""


def check_upload(update: RowUpdate, clip: float, tables: Collection[str]) -> None:
    """Refuse a plain upload (in ``tables``) that no honest organisation sends.

    :func:`widen` puts ``clip r`` in the right half and ``delta sqrt(r)`` in the left,
    with ``r = v / CLIP`` in ``[0, 1]`` and ``|delta| <= clip``. So every right entry is in
    ``[0, clip]``, and every left one within ``sqrt(clip x right)``: a step no larger than
    the clip, for the normaliser it comes with. Both are checked with the float16 wire's
    rounding to spare. A negative normaliser would sink the federation's and scale the
    other organisations' steps of the row up. A left half beyond its normaliser (the clip
    with a normaliser of 0) would have its own step weighted by ``sqrt(CLIP / v)``, ten
    times the clip and more, where the README bounds a plain organisation's weight by
    ``sqrt(n)``. A secure sum cannot be checked this way, and is bounded by :func:`narrow`
    instead.

    Raises
    ------
    UpdateError
        Naming the table, the half and how many entries are out of range.
    """
    for name, tu in update.items():
        if name not in tables or not tu.num_rows:
            continue
        dim = tu.delta.shape[1] // 2
        left = np.abs(tu.delta[:, :dim].astype(np.float64))
        right = tu.delta[:, dim:].astype(np.float64)
        bad = int(np.count_nonzero((right < 0) | (right > clip * (1 + 1e-3))))
        if bad:
            raise UpdateError(f"table {name!r}: {bad} normaliser entries outside [0, {clip:g}] "
                              f"(smallest {right.min():.4g}, largest {right.max():.4g})")
        bound = np.sqrt(clip * (np.maximum(right, 0.0) + FLOAT16_QUANTUM)) * (1 + 2e-3) + FLOAT16_QUANTUM
        over = left > bound
        if over.any():
            worst = float((left / bound).max())
            raise UpdateError(f"table {name!r}: {int(over.sum())} step entries beyond what their normaliser allows "
                              f"(|step| <= sqrt({clip:g} x normaliser); up to {worst:.3g} times that): a step larger "
                              "than the clip, or a normaliser sunk below the one its step was taken with")


def narrow(agg: AggregateSum, clip: float, tables: Collection[str]) -> AggregateSum:
    """The sums of widened uploads turned back into row steps: ``sum_k w_k delta_k sqrt(v_k / v)``.

    Parameters
    ----------
    agg : AggregateSum
        Per-row sums of the uploads, plain or secure alike: :func:`widen`'s (``2 dim``
        wide) for the tables in ``tables``, plain deltas for the others.
    clip : float
        The round's ``delta_clip``.
    tables : Collection[str]
        The tables that carry the normaliser (``TrainConfig.pooled_tables``).

    Returns
    -------
    AggregateSum
        The same rows and weights, ``dim`` wide; tables not in ``tables`` as they were. In
        those that are, each row's federation normaliser is
        ``v = (sum of right halves) CLIP / (clip sum w)``, floored at :data:`FLOOR`, and its
        step the sum of left halves times ``sqrt(CLIP / v)``, every coordinate bounded by
        ``clip * sum w``.
    """
    out: AggregateSum = {}
    for name, ts in agg.items():
        if name not in tables:
            out[name] = ts
            continue
        wide = ts.weighted_delta.astype(np.float64)
        if wide.ndim != 2 or wide.shape[1] % 2:
            raise ValueError(f"table {name!r}: a pooled-normaliser sum must be 2 dim wide, got {wide.shape}")
        dim = wide.shape[1] // 2
        w = ts.weight.astype(np.float64)[:, None]
        v = np.maximum(wide[:, dim:] * CLIP / (clip * np.maximum(w, 1e-30)), FLOOR)
        step = wide[:, :dim] * np.sqrt(CLIP / v)
        bound = clip * w
        over = int(np.count_nonzero(np.abs(step) > bound * (1 + 1e-6)))
        if over:
            log.warning("table %r: %d step entries beyond clip x sum of weights were bounded (the federation's "
                        "normaliser of their rows is far below its organisations' own)", name, over)
        out[name] = TableSum(ids=ts.ids, weighted_delta=np.clip(step, -bound, bound), weight=ts.weight)
    return out
