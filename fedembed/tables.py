"""Versioned shared tables: seeded version 0, per-row version stamps, row sync.

Version 0 of every table is a seeded initialisation that any party regenerates from the
run seed, so nothing of it travels. The coordinator stamps each row with the round that
last changed it; an organisation that last saw version ``v`` downloads only rows whose
stamp is above ``v``.
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
    """Rows of one table to overwrite: ``table[ids] = values``."""

    ids: np.ndarray
    values: np.ndarray


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
        """Rows changed after version ``since`` (all changed rows for ``since=0``)."""
        out = {}
        for name, stamps in self.versions.items():
            ids = np.flatnonzero(stamps > since).astype(np.int64)
            out[name] = RowSync(ids, self.tables[name][ids])
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
