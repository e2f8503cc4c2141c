"""Row-sparse updates of embedding tables.

An organisation touches a small set of rows of each shared table per round. What it sends
is, per table, the sorted unique row ids it touched, the delta of those rows and one weight
per row (how many local training examples used the row, capped). The coordinator sums
``weight * delta`` and ``weight`` per row over the organisations that touched it and divides,
so cold rows are never shrunk towards zero by organisations that never saw them.

Everything here is plain numpy: the same functions serve the plain path, the secure path
(which masks the very same numbers) and the tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fedembed.errors import FedembedError

log = logging.getLogger(__name__)

WIRE_DTYPES = {"float16": np.float16, "float32": np.float32}


class UpdateError(FedembedError, ValueError):
    """An update that must not be aggregated (bad shape, dtype, ids or values)."""


@dataclass
class TableUpdate:
    """The row-sparse update of one table from one organisation.

    Parameters
    ----------
    ids : np.ndarray
        Sorted, unique row ids, int64, shape ``(n,)``.
    delta : np.ndarray
        New minus old value of those rows, float32, shape ``(n, dim)``.
    weight : np.ndarray
        Non-negative weight of each row (examples that used it), float32, shape ``(n,)``.
    """

    ids: np.ndarray
    delta: np.ndarray
    weight: np.ndarray

    @property
    def num_rows(self) -> int:
        """Number of rows carried."""
        return int(self.ids.shape[0])


RowUpdate = dict[str, TableUpdate]
"""One organisation's update: table name -> :class:`TableUpdate`."""


@dataclass
class TableSum:
    """Per-row sums over organisations for one table.

    Parameters
    ----------
    ids : np.ndarray
        Sorted unique row ids that at least one organisation touched, int64 ``(n,)``.
    weighted_delta : np.ndarray
        ``sum_i weight_i * delta_i`` per row, float64 ``(n, dim)``.
    weight : np.ndarray
        ``sum_i weight_i`` per row, float64 ``(n,)``, all > 0.
    """

    ids: np.ndarray
    weighted_delta: np.ndarray
    weight: np.ndarray

    def mean(self) -> np.ndarray:
        """Per-row weighted mean of the deltas, float32 ``(n, dim)``."""
        return (self.weighted_delta / self.weight[:, None]).astype(np.float32)


AggregateSum = dict[str, TableSum]
"""The coordinator's view after aggregation: table name -> :class:`TableSum`."""


def validate_update(
    update: Mapping[str, TableUpdate],
    shapes: Mapping[str, tuple[int, int]],
    max_weight: float | None = None,
) -> None:
    """Check an update against the table shapes; raise :class:`UpdateError` on any fault.

    Parameters
    ----------
    update : Mapping[str, TableUpdate]
        The update to check.
    shapes : Mapping[str, tuple[int, int]]
        ``(rows, dim)`` of every shared table.
    max_weight : float, optional
        Largest weight a row may carry.

    Raises
    ------
    UpdateError
        Unknown table, wrong shape or dtype, ids out of range, duplicate or unsorted
        ids, NaN/inf values or negative weights.
    """
    for name, tu in update.items():
        if name not in shapes:
            raise UpdateError(f"unknown table {name!r} (known: {sorted(shapes)})")
        rows, dim = shapes[name]
        ids, delta, weight = tu.ids, tu.delta, tu.weight
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise UpdateError(f"table {name!r}: ids must be a 1-d integer array, got {ids.dtype} {ids.shape}")
        n = ids.shape[0]
        if delta.shape != (n, dim):
            raise UpdateError(f"table {name!r}: delta shape {delta.shape}, expected ({n}, {dim})")
        if weight.shape != (n,):
            raise UpdateError(f"table {name!r}: weight shape {weight.shape}, expected ({n},)")
        if not (np.issubdtype(delta.dtype, np.floating) and np.issubdtype(weight.dtype, np.floating)):
            raise UpdateError(f"table {name!r}: delta and weight must be floating point")
        if n:
            if ids.min() < 0 or ids.max() >= rows:
                raise UpdateError(
                    f"table {name!r}: row id out of range [0, {rows}): min {ids.min()}, max {ids.max()}"
                )
            if np.any(np.diff(ids) <= 0):
                raise UpdateError(f"table {name!r}: row ids are duplicated or unsorted")
        if not np.all(np.isfinite(delta)):
            raise UpdateError(f"table {name!r}: delta holds NaN or inf")
        if not np.all(np.isfinite(weight)) or np.any(weight < 0):
            raise UpdateError(f"table {name!r}: weights must be finite and >= 0")
        if max_weight is not None and n and weight.max() > max_weight:
            raise UpdateError(f"table {name!r}: weight {weight.max()} above the cap {max_weight}")


def sum_updates(updates: list[RowUpdate], tables: list[str]) -> AggregateSum:
    """Sum row-sparse updates per row: ``sum w*delta`` and ``sum w`` over contributors.

    Parameters
    ----------
    updates : list[RowUpdate]
        Validated updates, one per organisation.
    tables : list[str]
        Names of the tables to aggregate.

    Returns
    -------
    AggregateSum
        For every table, the rows with positive total weight.
    """
    out: AggregateSum = {}
    for name in tables:
        parts = [u[name] for u in updates if name in u and u[name].num_rows]
        if not parts:
            continue
        ids = np.unique(np.concatenate([p.ids for p in parts]).astype(np.int64))
        dim = parts[0].delta.shape[1]
        wd = np.zeros((ids.shape[0], dim), dtype=np.float64)
        w = np.zeros(ids.shape[0], dtype=np.float64)
        for p in parts:  # ids are unique within one update, so fancy-index += is exact
            pos = np.searchsorted(ids, p.ids)
            pw = p.weight.astype(np.float64)
            wd[pos] += p.delta.astype(np.float64) * pw[:, None]
            w[pos] += pw
        keep = w > 0
        out[name] = TableSum(ids=ids[keep], weighted_delta=wd[keep], weight=w[keep])
    return out
