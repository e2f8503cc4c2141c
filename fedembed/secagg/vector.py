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

Bounds on an unmasked sum
-------------------------
Clipping happens in the sender, before masking, so a hostile organisation can skip it or
send any uint32 it likes. After unmasking, the coordinator therefore checks every entry of
the secure sum against what honest organisations can produce, and refuses the sum
(:class:`~fedembed.sparse.UpdateError`) when any entry is outside. With ``d`` the number of
vectors summed (``delivered``), ``W = max_weight``, ``c = clip_delta`` and the scales
``s_w``, ``s_d`` of :class:`ValueScales`:

- **indicators** (:func:`rowset_from_counts`): every per-row count ``<= d``;
- **weights** (:func:`decode_values`): ``0 <= sum_w <= d * W`` (checked on the integers:
  ``0 <= sum q_w <= d * round(W * s_w)``, i.e. a tolerance of ``d / (2 s_w)``); in
  ``union`` mode also ``sum_w <= count_r * W`` per row (on the integers likewise), where
  ``count_r`` is the row's indicator count. Organisations that dropped between the two
  phases only lower ``sum_w``, so the bound is sound;
- **weighted deltas**: per entry ``|sum w*delta| <= c * (sum_w + d / (2 s_w)) + d / (2 s_d)``
  (each organisation's quantized weight is off by at most ``1 / (2 s_w)`` and its quantized
  ``w*delta`` by at most ``1 / (2 s_d)``), plus a relative float slack of 1e-12. Every
  per-row mean ``sum w*delta / sum w`` is therefore in the honest range ``[-c, c]``.

Whoever sent the offending values cannot be identified inside a masked sum, so the whole
sum is refused (the round is abandoned), and nobody is named.

With distributed DP noise (:class:`ValueScales` ``noise``, :mod:`fedembed.dp.distributed`;
``dense`` row set only) every organisation puts the same public weight ``W`` on every row,
so the weights must sum to exactly ``d * W`` everywhere; every entry of the weighted deltas
is bounded by ``d * (W min(clip_delta, C) s + 1/2)`` plus the noise tail of ``d`` shares
(:meth:`~fedembed.dp.distributed.DistributedNoise.sum_bound`, exceeded by an honest sum with
probability at most 2^-40). The noise itself cannot be checked: a missing or partial
share passes.

**What the checks cannot stop** (that needs zero-knowledge proofs on each vector). The
checks bound the *sum*, not one organisation's share of it. An accepted sum is always one
that honest organisations could have produced, but within it one hostile organisation can:

- put any row of ``U`` (touched by it or not) anywhere in ``[-c, c]`` per entry: its own
  vector is unbounded, so it can add up to ``2 * c * sum_w`` to a row whose honest mean is
  at ``-c`` (an honest organisation with extreme data and weight ``w`` moves a row's mean
  by at most ``2 * c * w / sum_w``). The values it adds are blind (it does not know the
  masked honest sums), so overshooting gets the sum refused rather than accepted;
- get any sum refused, every round (a denial of service), without being identified;
- inflate a row's ``sum_w`` up to what the bounds leave (``d * W`` in all, ``count_r * W``
  per row in ``union`` mode): with no ``w*delta`` of its own this shrinks the row's mean
  toward 0, one more way of moving it within ``[-c, c]``;
- in ``union`` mode: add rows to ``U`` (claiming to touch them), and set any row's count
  to any value in ``[0, d]`` -- not only lower it by 1: a counter of ``2^bits - j``
  cancels ``j`` honest indicators. A count brought to 0 removes the row from ``U``; the
  honest organisations that touched it see their row missing from ``U`` (the
  organisation-side check, :mod:`fedembed.secagg.client`). A count lowered but still
  positive tightens that row's weight bound, which can only get an honest sum refused
  (denial of service again); a count raised loosens it, at most to the global ``d * W``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedembed.dp.distributed import DistributedNoise
from fedembed.dp.noise import SecureRandom
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
    return rows_indicator({name: tu.ids for name, tu in update.items()}, shapes, n)


def rows_indicator(rows: Mapping[str, np.ndarray], shapes: Shapes, n: int) -> np.ndarray:
    """1 at every row of ``rows`` (table name -> row ids), 0 elsewhere, tables concatenated in name order.

    Raises
    ------
    UpdateError
        A table that is not shared, or ids out of its range.
    """
    unknown = sorted(set(rows) - set(shapes))
    if unknown:
        raise UpdateError(f"rows of tables that are not shared: {unknown}")
    out = np.zeros(indicator_length(shapes), dtype=indicator_dtype(n))
    offset = 0
    for name in sorted(shapes):
        ids = np.asarray(rows.get(name, np.zeros(0, np.int64)), dtype=np.int64)
        if ids.size:
            if ids.min() < 0 or ids.max() >= shapes[name][0]:
                raise UpdateError(f"rows of table {name!r} out of its range [0, {shapes[name][0]})")
            out[offset + ids] = 1
        offset += shapes[name][0]
    return out


def rowset_from_counts(counts: np.ndarray, shapes: Shapes, delivered: int) -> tuple[RowSet, dict[str, np.ndarray]]:
    """The union row set (rows with a positive count) and the counts of those rows.

    Parameters
    ----------
    counts : np.ndarray
        The unmasked sum of the indicator vectors, unsigned, length :func:`indicator_length`.
    shapes : Mapping[str, tuple[int, int]]
        ``(rows, dim)`` of every shared table.
    delivered : int
        How many indicator vectors were summed: no honest count exceeds it.

    Returns
    -------
    rowset : dict[str, np.ndarray]
        Per table, the sorted ids of the rows with a positive count.
    counts : dict[str, np.ndarray]
        Per table, the int64 counts of those rows (for :func:`decode_values` in ``union`` mode).

    Raises
    ------
    UpdateError
        If the sum has the wrong shape, or a count exceeds ``delivered`` (a cancel or
        garbage indicator vector; the sum is refused, its sender cannot be identified).
    """
    if delivered < 1:
        raise ValueError(f"delivered must be >= 1, got {delivered}")
    if counts.shape != (indicator_length(shapes),):
        raise UpdateError(f"indicator sum has shape {counts.shape}, expected ({indicator_length(shapes)},)")
    rowset, per_row = {}, {}
    offset = 0
    for name in sorted(shapes):
        rows = shapes[name][0]
        block = counts[offset : offset + rows]
        if block.size and int(block.max()) > delivered:
            bad = int(np.count_nonzero(block > delivered))
            raise _refused(
                "indicator bound (count <= parties whose indicators were summed)",
                name,
                bad,
                f"largest count {int(block.max())}, {delivered} indicator vectors summed",
            )
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
    noise : DistributedNoise, optional
        Distributed DP noise in the sum (dense row set only): the data scale is then the
        noise's (:attr:`DistributedNoise.scale`), and ``n`` parties must not be able to
        wrap the noisy sum.
    """

    n: int
    clip_delta: float
    max_weight: float
    noise: DistributedNoise | None = None

    def __post_init__(self) -> None:
        if self.noise is not None:
            if self.noise.max_weight != self.max_weight or self.noise.clip_delta != self.clip_delta:
                raise ValueError("distributed noise was set up for another weight cap or delta clip")
            self.noise.check_no_wrap(self.n)

    @property
    def data_clip(self) -> float:
        """Clip of ``weight * delta``."""
        return self.noise.entry_clip if self.noise is not None else self.clip_delta * self.max_weight

    @property
    def data_scale(self) -> float:
        """Scale of ``weight * delta``."""
        return self.noise.scale if self.noise is not None else scale_for(self.data_clip, self.n)

    @property
    def weight_scale(self) -> float:
        """Scale of the weights (integer: integer weights sum exactly)."""
        return scale_for(self.max_weight, self.n)

    def bound(self) -> float:
        """Worst-case error of one coordinate of ``sum w*delta`` (``n / (2 s)``)."""
        return error_bound(self.n, self.data_scale)


def encode_values(
    update: RowUpdate, rowset: RowSet, shapes: Shapes, scales: ValueScales, wire_dtype: str = "float16",
    noise_random: SecureRandom | None = None,
) -> tuple[np.ndarray, int]:
    """The uint32 value vector of one organisation's update over ``rowset``.

    Parameters
    ----------
    update, rowset, shapes, scales, wire_dtype
        The update, the agreed rows, the tables, the round's encoding, the wire dtype its
        deltas are rounded to first.
    noise_random : SecureRandom, optional
        With ``scales.noise``: the organisation's secret source of its discrete Gaussian
        share (required then, refused otherwise).

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
    if scales.noise is not None or noise_random is not None:
        if scales.noise is None or noise_random is None:
            raise ValueError("distributed noise needs both the round's noise (scales.noise) and a noise source")
        return _encode_noisy(update, rowset, shapes, scales, wire_dtype, noise_random)
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
        delta = _wire_delta(tu.delta, wire_dtype)  # the very numbers the plain path would send
        clipped += count_clipped(delta, scales.clip_delta)
        delta = np.clip(delta, -scales.clip_delta, scales.clip_delta)
        data = block[: ids.size * dim].reshape(ids.size, dim)
        data[pos] = quantize(delta * w[:, None], scales.data_clip, s_d)
        block[ids.size * dim :][pos] = quantize(w, scales.max_weight, s_w)
    return out, clipped


def _wire_delta(delta: np.ndarray, wire_dtype: str) -> np.ndarray:
    """``delta`` rounded to the wire dtype exactly as the plain path sends it, as float64."""
    if wire_dtype == "float16":
        delta = np.clip(delta, -65000.0, 65000.0)
    return delta.astype(WIRE_DTYPES[wire_dtype]).astype(np.float64)


def _encode_noisy(
    update: RowUpdate, rowset: RowSet, shapes: Shapes, scales: ValueScales, wire_dtype: str, rng: SecureRandom
) -> tuple[np.ndarray, int]:
    """The value vector with a distributed discrete Gaussian share (:mod:`fedembed.dp.distributed`).

    ``delta`` is clipped per entry to ``clip_delta`` and, over every table together, to L2
    norm ``noise.clip``; every row of the (dense) row set gets weight ``max_weight``;
    ``round(W * delta * s)`` plus ``N_Z(0, S)`` per entry, modulo 2^32.
    """
    noise = scales.noise
    assert noise is not None
    rows = sum(rowset[name].size for name in sorted(shapes))
    if rows != sum(shapes[name][0] for name in shapes) or values_length(rowset, shapes) - rows != noise.entries:
        raise UpdateError("distributed DP noise covers the dense row set only (every row of every table); "
                          f"this row set has {rows} rows")
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    clipped, sq = 0, 0.0
    for name in sorted(shapes):
        tu = update.get(name)
        if tu is None or not tu.num_rows:
            continue
        ids = rowset[name]
        pos = np.searchsorted(ids, tu.ids)
        if np.any(pos >= ids.size) or np.any(ids[np.minimum(pos, ids.size - 1)] != tu.ids):
            raise UpdateError(f"table {name!r}: the update touches rows outside the agreed row set")
        delta = _wire_delta(tu.delta, wire_dtype)
        clipped += count_clipped(delta, scales.clip_delta)
        delta = np.clip(delta, -scales.clip_delta, scales.clip_delta)
        sq += float(np.square(delta).sum())
        deltas[name] = (pos, delta)
    norm = math.sqrt(sq)
    factor = min(1.0, noise.clip / norm) if norm > 0 else 1.0
    if factor < 1.0:
        log.info("distributed DP: update of L2 norm %.4g clipped to %g", norm, noise.clip)
    s_d, s_w = scales.data_scale, scales.weight_scale
    share = noise.local_variance
    out = np.zeros(values_length(rowset, shapes), dtype=np.uint32)
    offset = 0
    for name in sorted(shapes):
        ids, dim = rowset[name], shapes[name][1]
        block = out[offset : offset + ids.size * (dim + 1)]
        offset += block.size
        data = block[: ids.size * dim].reshape(ids.size, dim)
        pos, delta = deltas.get(name, (np.zeros(0, np.int64), np.zeros((0, dim))))
        step = max(1, _NOISE_CHUNK // max(dim, 1))
        for start in range(0, ids.size, step):  # row chunks: no table-sized int64 temporaries
            stop = min(start + step, ids.size)
            chunk = rng.discrete_gaussian(share, (stop - start) * dim).reshape(stop - start, dim)
            lo, hi = np.searchsorted(pos, [start, stop])
            chunk[pos[lo:hi] - start] += np.rint(delta[lo:hi] * (factor * scales.max_weight * s_d)).astype(np.int64)
            data[start:stop] = (chunk % 2**32).astype(np.uint32)
        block[ids.size * dim :] = quantize(np.full(ids.size, scales.max_weight), scales.max_weight, s_w)
    return out, clipped


_NOISE_CHUNK = 1 << 20
"""Entries of noise drawn at a time when encoding a noisy vector."""


_FLOAT_SLACK = 1e-12
"""Relative slack on the weighted-delta bound: float64 rounding in computing it (about 1e-16)."""

_COUNT_CHUNK = 1 << 16
"""Rows per chunk when counting out-of-bounds entries (bounds the temporaries)."""


def _refused(bound: str, table: str, entries: int, detail: str) -> UpdateError:
    """The error refusing a secure sum: which bound, which table, how many entries."""
    return UpdateError(
        f"secure sum refused: {bound} violated in table {table!r} at {entries} "
        f"entr{'y' if entries == 1 else 'ies'} ({detail}); the values that broke it are inside a "
        "masked sum, so the organisation that sent them cannot be identified"
    )


def _count_outside(block: np.ndarray, rows: np.ndarray, limit: np.ndarray) -> int:
    """Entries of ``block[rows]`` (int32 quanta) with ``|q| > limit[rows]``, counted chunk by chunk."""
    total = 0
    for start in range(0, rows.size, _COUNT_CHUNK):
        r = rows[start : start + _COUNT_CHUNK]
        part = block[r].astype(np.int64)
        np.abs(part, out=part)
        total += int(np.count_nonzero(part > limit[r, None]))
    return total


def decode_values(
    total: np.ndarray,
    rowset: RowSet,
    shapes: Shapes,
    scales: ValueScales,
    delivered: int,
    counts: Mapping[str, np.ndarray] | None = None,
) -> AggregateSum:
    """Per-row sums from the unmasked sum of value vectors (rows with positive weight only).

    Every entry of the sum is first checked against what ``delivered`` honest
    organisations can produce (see the module docstring, "Bounds on an unmasked sum").

    Parameters
    ----------
    total : np.ndarray
        The unmasked modular sum of the value vectors, uint32, length :func:`values_length`.
    rowset : dict[str, np.ndarray]
        The agreed rows the vectors were laid out over.
    shapes : Mapping[str, tuple[int, int]]
        ``(rows, dim)`` of every shared table.
    scales : ValueScales
        The round's quantization (``scales.n`` >= ``delivered``).
    delivered : int
        How many value vectors were summed.
    counts : Mapping[str, np.ndarray], optional
        ``union`` mode: per table, the indicator count of every row of ``rowset`` (as
        returned by :func:`rowset_from_counts`); adds the per-row bound
        ``sum_w <= count_r * max_weight``.

    Raises
    ------
    UpdateError
        If the sum has the wrong length, or any entry is outside the honest bounds: a
        negative weight sum, a weight sum above ``delivered * max_weight`` (or above
        ``count_r * max_weight`` in ``union`` mode), or a weighted delta above
        ``clip_delta * sum_w`` plus the quantization tolerance. The sender cannot be
        identified: the whole sum is refused.
    ValueError
        If ``delivered`` is not in ``[1, scales.n]`` or ``counts`` does not match ``rowset``
        (a caller's mistake, not a faulty contribution).
    """
    if not 1 <= delivered <= scales.n:
        raise ValueError(f"delivered must be in [1, {scales.n}] (the round's n), got {delivered}")
    if total.shape != (values_length(rowset, shapes),):
        raise UpdateError(f"value sum has shape {total.shape}, expected ({values_length(rowset, shapes)},)")
    total = np.asarray(total, dtype=np.uint32)
    if scales.noise is not None:
        return _decode_noisy(total, rowset, shapes, scales, delivered)
    s_d, s_w = scales.data_scale, scales.weight_scale
    # an honest weight w <= max_weight quantizes to at most this (quantize rounds monotonically)
    q_w_max = int(np.rint(np.float64(scales.max_weight) * s_w))
    # per-row |sum q_d| <= ratio * (sum q_w + d/2) + d/2: |w*delta| <= c*w, w <= (q_w + 1/2)/s_w
    ratio = scales.clip_delta * s_d / s_w
    half = delivered / 2.0
    out: AggregateSum = {}
    for name, ids, block, weights in _table_blocks(total, rowset, shapes):
        m, dim = block.shape
        qw = weights.view(np.int32).astype(np.int64)
        if m and qw.min() < 0:
            raise _refused(
                "weight bound (sum_w >= 0)",
                name,
                int(np.count_nonzero(qw < 0)),
                f"smallest sum_w {qw.min() / s_w:.6g}",
            )
        if m and qw.max() > delivered * q_w_max:
            raise _refused(
                "weight bound (sum_w <= delivered * max_weight)",
                name,
                int(np.count_nonzero(qw > delivered * q_w_max)),
                f"largest sum_w {qw.max() / s_w:.6g} > {delivered} x {scales.max_weight:g}"
                f" + tolerance {error_bound(delivered, s_w):.3g}",
            )
        if counts is not None:
            c = counts[name]
            if c.shape != (m,):
                raise ValueError(f"counts of {name!r} have shape {c.shape}, expected ({m},) like the row set")
            over = qw > c.astype(np.int64) * q_w_max
            if over.any():
                worst = int(np.argmax(qw - c.astype(np.int64) * q_w_max))
                raise _refused(
                    "union weight bound (sum_w <= count_r * max_weight per row)",
                    name,
                    int(np.count_nonzero(over)),
                    f"e.g. row {int(ids[worst])}: sum_w {qw[worst] / s_w:.6g} with count {int(c[worst])},"
                    f" cap {scales.max_weight:g}",
                )
        if m and dim:
            q = block.view(np.int32)
            # per-row extremes by reduction: no block-sized temporary
            peak = np.maximum(q.max(axis=1).astype(np.int64), -q.min(axis=1).astype(np.int64))
            limit = (ratio * (qw + half) + half) * (1.0 + _FLOAT_SLACK)
            bad = peak > limit
            if bad.any():
                rows = np.flatnonzero(bad)
                worst = int(rows[np.argmax(peak[rows] - limit[rows])])
                raise _refused(
                    "weighted-delta bound (|sum w*delta| <= clip_delta * sum_w + tolerance)",
                    name,
                    _count_outside(q, rows, limit),
                    f"e.g. row {int(ids[worst])}: |sum w*delta| {peak[worst] / s_d:.6g} > "
                    f"{limit[worst] / s_d:.6g} = {scales.clip_delta:g} x sum_w {qw[worst] / s_w:.6g}"
                    " + tolerance",
                )
        weight = dequantize(weights, s_w)
        keep = weight > 0
        if keep.any():
            # dequantize only the rows someone touched (in dense mode a small part of the table)
            data = dequantize(block if keep.all() else block[keep], s_d)
            # The bound above spares the rounding tolerance, which is large against a tiny sum_w: a hostile
            # organisation giving a row a weight of one quantum could then set its mean (what the mean-based
            # server steps take) to several times the clip. Every mean is clipped to +-clip here, in the plain
            # and the secure path alike (both decode here), so their sums stay bit-identical.
            kept = weight[keep]
            cap = (np.float64(scales.clip_delta) * kept.astype(np.float64))[:, None].astype(data.dtype)
            np.clip(data, -cap, cap, out=data)
            out[name] = TableSum(ids=ids[keep], weighted_delta=data, weight=kept)
    return out


def _table_blocks(total: np.ndarray, rowset: RowSet,
                  shapes: Shapes) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Per table (sorted by name): its rows of U, its ``(m, dim)`` block of the value sum and its ``m`` weight sums.

    Views into ``total`` (the layout :func:`encode_values` writes), nothing copied.
    """
    offset = 0
    for name in sorted(shapes):
        ids, dim = rowset[name], shapes[name][1]
        m = ids.size
        yield name, ids, total[offset : offset + m * dim].reshape(m, dim), total[offset + m * dim : offset + m * (dim + 1)]
        offset += m * (dim + 1)


def _decode_noisy(total: np.ndarray, rowset: RowSet, shapes: Shapes, scales: ValueScales, delivered: int) -> AggregateSum:
    """:func:`decode_values` of a sum carrying distributed noise: every row, weights exactly ``d * W``."""
    noise = scales.noise
    assert noise is not None
    s_d, s_w = scales.data_scale, scales.weight_scale
    q_w = delivered * int(np.rint(np.float64(scales.max_weight) * s_w))
    limit = noise.sum_bound(delivered)
    out: AggregateSum = {}
    for name, ids, block, weights in _table_blocks(total, rowset, shapes):
        m, dim = block.shape
        qw = weights.view(np.int32).astype(np.int64)
        if m and np.any(qw != q_w):
            raise _refused("weight bound (every row's sum_w = delivered x max_weight under distributed noise)", name,
                           int(np.count_nonzero(qw != q_w)), f"expected {q_w / s_w:g}")
        if m and dim:
            q = block.view(np.int32)
            peak = max(int(q.max()), -int(q.min()))
            if peak > limit:
                raise _refused("noisy weighted-delta bound (|sum w*delta| <= delivered x clip + noise tail)", name,
                               _count_outside(q, np.arange(m), np.full(m, limit)),
                               f"largest |sum w*delta| {peak / s_d:.6g} > {limit / s_d:.6g}")
        if m:
            out[name] = TableSum(ids=ids.copy(), weighted_delta=dequantize(block, s_d), weight=dequantize(weights, s_w))
    return out


def fixed_point_sum(updates: list[RowUpdate], shapes: Shapes, scales: ValueScales, wire_dtype: str) -> AggregateSum:
    """Per-row sums of plain updates in the very fixed point the secure path sums in.

    The plain path aggregates with this, so a plain and a secure round over the same
    updates give bit-identical sums (masking cancels exactly), and the sum does not
    depend on the order replies arrived in. Against exact arithmetic it deviates by at
    most :meth:`ValueScales.bound` per coordinate of ``sum w*delta``; weights are exact.
    The sum goes through the same bound checks as a secure one (``delivered`` is the
    number of updates), which honest, validated updates always pass.
    """
    if not updates:
        return {}
    rowset = union_of([{name: tu.ids for name, tu in u.items()} for u in updates], shapes)
    total = np.zeros(values_length(rowset, shapes), dtype=np.uint32)
    for u in updates:
        vector, clipped = encode_values(u, rowset, shapes, scales, wire_dtype)
        if clipped:
            log.warning("aggregation: %d delta entries beyond +-%g were clipped", clipped, scales.clip_delta)
        total += vector
    return decode_values(total, rowset, shapes, scales, delivered=len(updates))
