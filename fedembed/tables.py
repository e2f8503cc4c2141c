"""Versioned shared tables: seeded version 0, per-row version stamps, row sync.

Version 0 of every table is a seeded initialisation that any party regenerates from the
run seed, so nothing of it travels. The coordinator stamps each row with the round that
last changed it; an organisation that last saw version ``v`` downloads only rows whose
stamp is above ``v`` (:meth:`VersionedTables.rows_since`), or, when it asked for its
working set only (a :class:`RowRequest` per table), only the rows of that set changed
since ``v`` plus the rows new to the set (:meth:`VersionedTables.rows_requested`).
Every synced row travels with its stamp, so the organisation can hold the stamps itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


def init_table(name: str, shape: tuple[int, int], seed: int, scale: float) -> np.ndarray:
    """Version 0 of table ``name``: normal(0, scale) values from a seed any party can use.

    Parameters
    ----------
    name : str
        Table name (mixed into the seed, so tables differ).
    shape : tuple[int, int]
        ``(rows, dim)``.
    seed : int
        Run seed.
    scale : float
        Standard deviation of the initial values.

    Returns
    -------
    np.ndarray
        float32 array of ``shape``; identical for identical arguments on every machine.
    """
    digest = hashlib.sha256(f"fedembed-table-init|{seed}|{name}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


@dataclass
class RowSync:
    """Rows of one table to overwrite: ``table[ids] = values``.

    Attributes
    ----------
    ids : np.ndarray
        Sorted row ids.
    values : np.ndarray
        float32 ``(len(ids), dim)``.
    stamps : np.ndarray or None
        The coordinator's version stamp of each row (the round that last changed it);
        None where a sender gave none.
    """

    ids: np.ndarray
    values: np.ndarray
    stamps: np.ndarray | None = None


@dataclass(frozen=True)
class RowRequest:
    """The rows of one table an organisation asks the coordinator to keep fresh (its working set).

    Attributes
    ----------
    ids : np.ndarray
        Sorted, unique int64 row ids: the rows it wants synced whenever they change.
    new : np.ndarray
        Sorted, unique subset of ``ids``: rows whose local copy is not known to be current
        at the cache version the request was made at (they are sent whatever their stamp
        above 0; the others only once changed after that version).
    """

    ids: np.ndarray
    new: np.ndarray

    def digest(self) -> bytes:
        """SHA-256 of the request (organisations with equal requests share one sync record)."""
        h = hashlib.sha256()
        for arr in (self.ids, self.new):
            a = np.ascontiguousarray(arr, dtype=np.int64)
            h.update(len(a).to_bytes(8, "big"))
            h.update(a.tobytes())
        return h.digest()


def request_digest(request: Mapping[str, RowRequest]) -> bytes:
    """One digest over a whole request (every table, by name)."""
    h = hashlib.sha256()
    for name in sorted(request):
        h.update(name.encode() + b"\0" + request[name].digest())
    return h.digest()


@dataclass
class VersionedTables:
    """The coordinator's tables with a version stamp per row.

    Parameters
    ----------
    tables : dict[str, np.ndarray]
        float32 ``(rows, dim)`` arrays.
    versions : dict[str, np.ndarray]
        int64 ``(rows,)``: the round that last changed each row (0 = initial value).
    version : int
        The last finished round.
    """

    tables: dict[str, np.ndarray]
    versions: dict[str, np.ndarray]
    version: int = 0
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def initial(shapes: Mapping[str, tuple[int, int]], seed: int, scale: float) -> VersionedTables:
        """Version 0 of every table."""
        tables = {n: init_table(n, s, seed, scale) for n, s in shapes.items()}
        versions = {n: np.zeros(s[0], dtype=np.int64) for n, s in shapes.items()}
        return VersionedTables(tables, versions, 0)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(rows, dim)`` per table."""
        return {n: tuple(t.shape) for n, t in self.tables.items()}  # type: ignore[misc]

    def rows_since(self, since: int) -> dict[str, RowSync]:
        """Rows changed after version ``since`` (all changed rows for ``since=0``), with their stamps."""
        out = {}
        for name, stamps in self.versions.items():
            ids = np.flatnonzero(stamps > since).astype(np.int64)
            out[name] = RowSync(ids, self.tables[name][ids], stamps[ids])
        return out

    def rows_requested(self, request: Mapping[str, RowRequest], since: int) -> dict[str, RowSync]:
        """The rows of an organisation's working set it lacks: changed after ``since``, or new to the set.

        Parameters
        ----------
        request : Mapping[str, RowRequest]
            Per table, the rows it asked for (validated: sorted, unique, in range).
        since : int
            The version its cache holds (the version the request's fresh rows are current at).

        Returns
        -------
        dict[str, RowSync]
            Per table, the rows of ``request.ids`` whose stamp is above ``since``, and the
            rows of ``request.new`` whose stamp is above 0 (version 0 is regenerated, never
            sent). A table the request does not name gets no rows.
        """
        out = {}
        for name, stamps in self.versions.items():
            req = request.get(name)
            if req is None:
                out[name] = RowSync(np.zeros(0, np.int64), self.tables[name][:0], stamps[:0])
                continue
            ids = np.asarray(req.ids, dtype=np.int64)
            st = stamps[ids]
            send = st > since
            if req.new.size:
                is_new = np.zeros(ids.shape[0], dtype=bool)
                is_new[np.searchsorted(ids, req.new)] = True
                send |= is_new & (st > 0)
            ids = ids[send]
            out[name] = RowSync(ids, self.tables[name][ids], st[send])
        return out

    def stamp(self, name: str, ids: np.ndarray, version: int) -> None:
        """Mark rows ``ids`` of ``name`` as changed in ``version``."""
        self.versions[name][ids] = version


def apply_sync(tables: dict[str, np.ndarray], sync: Mapping[str, RowSync]) -> int:
    """Overwrite rows of local tables with synced rows; returns the number of rows written."""
    n = 0
    for name, rs in sync.items():
        if name not in tables:
            raise KeyError(f"sync names unknown table {name!r}")
        tables[name][rs.ids] = rs.values
        n += rs.ids.shape[0]
    return n
