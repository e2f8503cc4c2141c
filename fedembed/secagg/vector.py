"""The vectors that get masked: per-row indicators, and row values over an agreed row set.

Both sides lay vectors out the same way, tables in sorted name order:

- **Indicator vector** (``union`` mode): one counter per row of every table, 1 where the
  organisation touched the row. Counters are uint8 (sums of up to 255 organisations; uint16
  or uint32 beyond), so the secure sum costs one byte per row, and its sum is the number of
  organisations that touched each row: the coordinator learns *how many*, never *who*.
- **Value vector**: for each table, over the agreed rows ``U_t`` (sorted ids), the
  ``|U_t| x dim`` block of ``weight * delta`` followed by the ``|U_t|`` weights, all
  quantized to uint32 (:mod:`fedembed.secagg.quantize`). Rows an organisation did not touch
  are zero. Summing the vectors gives, per row, ``sum w*delta`` and ``sum w``: the same
  per-row weighted mean as the plain path (:func:`fedembed.sparse.sum_updates`).

The deltas are first rounded to the wire dtype exactly as the plain path sends them, so a
secure and a plain run aggregate the same numbers and differ only by the quantization
bound.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedembed.secagg.quantize import count_clipped, dequantize, error_bound, quantize, scale_for
from fedembed.sparse import WIRE_DTYPES, AggregateSum, RowUpdate, TableSum, UpdateError

log = logging.getLogger(__name__)

RowSet = dict[str, np.ndarray]
"""Agreed rows per table: table name -> sorted unique int64 ids."""

Shapes = Mapping[str, tuple[int, int]]


def indicator_dtype(n: int) -> type:
    """Smallest unsigned dtype whose modulus exceeds ``n`` (the largest possible count)."""
    if n < 2**8:
        return np.uint8
    if n < 2**16:
        return np.uint16
    return np.uint32


def indicator_length(shapes: Shapes) -> int:
    """Length of the indicator vector: rows of all tables."""
    return sum(shapes[t][0] for t in sorted(shapes))


def indicator_vector(update: RowUpdate, shapes: Shapes, n: int) -> np.ndarray:
    """1 at every row the update touched, 0 elsewhere, tables concatenated in name order."""
    out = np.zeros(indicator_length(shapes), dtype=indicator_dtype(n))
    offset = 0
    for name in sorted(shapes):
        tu = update.get(name)
        if tu is not None and tu.num_rows:
            out[offset + tu.ids] = 1
        offset += shapes[name][0]
    return out


def rowset_from_counts(counts: np.ndarray, shapes: Shapes) -> tuple[RowSet, dict[str, np.ndarray]]:
    """The union row set (rows with a positive count) and the counts of those rows."""
    if counts.shape != (indicator_length(shapes),):
        raise UpdateError(f"indicator sum has shape {counts.shape}, expected ({indicator_length(shapes)},)")
    rowset, per_row = {}, {}
    offset = 0
    for name in sorted(shapes):
        rows = shapes[name][0]
        block = counts[offset : offset + rows]
        ids = np.flatnonzero(block).astype(np.int64)
        rowset[name] = ids
        per_row[name] = block[ids].astype(np.int64)
        offset += rows
    return rowset, per_row


def dense_rowset(shapes: Shapes) -> RowSet:
    """Every row of every table (the ``dense`` row-set mode)."""
    return {name: np.arange(shapes[name][0], dtype=np.int64) for name in sorted(shapes)}


def union_of(rowsets: list[RowSet], shapes: Shapes) -> RowSet:
    """Union of several row sets (the ``revealed`` mode's U)."""
    out = {}
    for name in sorted(shapes):
        parts = [rs[name] for rs in rowsets if name in rs]
        out[name] = np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    return out


def check_rowset(rowset: RowSet, shapes: Shapes) -> None:
    """Raise :class:`UpdateError` unless every table's ids are sorted, unique and in range."""
    for name, ids in rowset.items():
        if name not in shapes:
            raise UpdateError(f"row set names unknown table {name!r}")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise UpdateError(f"row set of {name!r} must be a 1-d integer array")
        if ids.size and (ids.min() < 0 or ids.max() >= shapes[name][0] or np.any(np.diff(ids) <= 0)):
            raise UpdateError(f"row set of {name!r} has ids out of range, duplicated or unsorted")


def values_length(rowset: RowSet, shapes: Shapes) -> int:
    """Length of the value vector over ``rowset``: ``sum_t |U_t| * (dim_t + 1)``."""
    return sum(rowset[name].size * (shapes[name][1] + 1) for name in sorted(shapes))


@dataclass(frozen=True)
class ValueScales:
    """How value vectors are quantized in one round.

    Parameters
    ----------
    n : int
        Organisations in the round (the most vectors in one sum).
    clip_delta : float
        Largest ``|delta|`` encoded; larger entries are clipped.
    max_weight : float
        Largest per-row weight (weights are validated against it).
    """

    n: int
    clip_delta: float
    max_weight: float

    @property
    def data_clip(self) -> float:
        """Clip of ``weight * delta``."""
        return self.clip_delta * self.max_weight

    @property
    def data_scale(self) -> float:
        """Scale of ``weight * delta``."""
        return scale_for(self.data_clip, self.n)

    @property
    def weight_scale(self) -> float:
        """Scale of the weights (integer: integer weights sum exactly)."""
        return scale_for(self.max_weight, self.n)

    def bound(self) -> float:
        """Worst-case error of one coordinate of ``sum w*delta`` (``n / (2 s)``)."""
        return error_bound(self.n, self.data_scale)


def encode_values(
    update: RowUpdate, rowset: RowSet, shapes: Shapes, scales: ValueScales, wire_dtype: str = "float16"
) -> tuple[np.ndarray, int]:
    """The uint32 value vector of one organisation's update over ``rowset``.

    Returns
    -------
    vector : np.ndarray
        uint32, length :func:`values_length`.
    clipped : int
        Entries of ``delta`` that exceeded ``clip_delta`` and were clipped.

    Raises
    ------
    UpdateError
        If the update touches a row outside the agreed row set, or a weight is out of range.
    """
    out = np.zeros(values_length(rowset, shapes), dtype=np.uint32)
    offset, clipped = 0, 0
    s_d, s_w = scales.data_scale, scales.weight_scale
    for name in sorted(shapes):
        ids, dim = rowset[name], shapes[name][1]
        block = out[offset : offset + ids.size * (dim + 1)]
        offset += block.size
        tu = update.get(name)
        if tu is None or not tu.num_rows:
            continue
        pos = np.searchsorted(ids, tu.ids)
        if np.any(pos >= ids.size) or np.any(ids[np.minimum(pos, ids.size - 1)] != tu.ids):
            raise UpdateError(f"table {name!r}: the update touches rows outside the agreed row set")
        w = tu.weight.astype(np.float64)
        if np.any(w < 0) or np.any(w > scales.max_weight):
            raise UpdateError(f"table {name!r}: weights outside [0, {scales.max_weight}]")
        delta = tu.delta
        if wire_dtype == "float16":  # the very numbers the plain path would send
            delta = np.clip(delta, -65000.0, 65000.0)
        delta = delta.astype(WIRE_DTYPES[wire_dtype]).astype(np.float64)
        clipped += count_clipped(delta, scales.clip_delta)
        delta = np.clip(delta, -scales.clip_delta, scales.clip_delta)
        data = block[: ids.size * dim].reshape(ids.size, dim)
        data[pos] = quantize(delta * w[:, None], scales.data_clip, s_d)
        block[ids.size * dim :][pos] = quantize(w, scales.max_weight, s_w)
    return out, clipped


def decode_values(total: np.ndarray, rowset: RowSet, shapes: Shapes, scales: ValueScales) -> AggregateSum:
    """Per-row sums from the unmasked sum of value vectors (rows with positive weight only).

    Raises
    ------
    UpdateError
        If the sum has the wrong length or decodes to impossible values (negative or
        excessive weights: a faulty or malicious contribution).
    """
    if total.shape != (values_length(rowset, shapes),):
        raise UpdateError(f"value sum has shape {total.shape}, expected ({values_length(rowset, shapes)},)")
    out: AggregateSum = {}
    offset = 0
    for name in sorted(shapes):
        ids, dim = rowset[name], shapes[name][1]
        m = ids.size
        weight = dequantize(total[offset + m * dim : offset + m * (dim + 1)], scales.weight_scale)
        tol = error_bound(scales.n, scales.weight_scale)
        if np.any(weight < -tol) or np.any(weight > scales.n * scales.max_weight + tol):
            raise UpdateError(f"table {name!r}: aggregated weights out of range (a faulty contribution)")
        keep = weight > 0
        if keep.any():
            block = total[offset : offset + m * dim].reshape(m, dim)
            # dequantize only the rows someone touched (in dense mode a small part of the table)
            data = dequantize(block if keep.all() else block[keep], scales.data_scale)
            out[name] = TableSum(ids=ids[keep], weighted_delta=data, weight=weight[keep])
        offset += m * (dim + 1)
    return out


def fixed_point_sum(updates: list[RowUpdate], shapes: Shapes, scales: ValueScales, wire_dtype: str) -> AggregateSum:
    """Per-row sums of plain updates in the very fixed point the secure path sums in.

    The plain path aggregates with this, so a plain and a secure round over the same
    updates give bit-identical sums (masking cancels exactly), and the sum does not
    depend on the order replies arrived in. Against exact arithmetic it deviates by at
    most :meth:`ValueScales.bound` per coordinate of ``sum w*delta``; weights are exact.
    """
    rowset = union_of([{name: tu.ids for name, tu in u.items()} for u in updates], shapes)
    total = np.zeros(values_length(rowset, shapes), dtype=np.uint32)
    for u in updates:
        vector, clipped = encode_values(u, rowset, shapes, scales, wire_dtype)
        if clipped:
            log.warning("aggregation: %d delta entries beyond +-%g were clipped", clipped, scales.clip_delta)
        total += vector
    return decode_values(total, rowset, shapes, scales)
