"""Server-side math: per-row weighted mean, server optimizer step, version stamps.

The aggregate of a round is a :class:`fedembed.sparse.AggregateSum` (from the plain path
or the secure path alike). Its per-row weighted mean is a pseudo-gradient that a server
optimizer applies to the touched rows only; every changed row is stamped with the round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fedembed.sparse import AggregateSum
from fedembed.tables import VersionedTables

log = logging.getLogger(__name__)

SERVER_OPTIMIZERS = ("sgd", "adagrad")


@dataclass
class ServerOptimizer:
    """A server optimizer over row-sparse pseudo-gradients.

    Parameters
    ----------
    name : str
        ``sgd``: ``row += lr * mean_delta`` (``lr=1`` is plain FedAvg of the rows).
        ``adagrad``: row-wise Adagrad (one accumulator per row, the mean square of its
        pseudo-gradient): ``acc += mean(d**2)``; ``row += lr * d / (sqrt(acc) + eps)``.
    lr : float
        Server learning rate.
    eps : float
        Adagrad's numerical floor.
    state : dict[str, np.ndarray]
        Optimizer state per table (Adagrad accumulators); saved in checkpoints.
    """

    name: str = "sgd"
    lr: float = 1.0
    eps: float = 1e-3
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose one of {SERVER_OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.lr}")

    def step(self, tables: VersionedTables, agg: AggregateSum, version: int) -> int:
        """Apply one round's aggregate to ``tables`` and stamp the rows with ``version``.

        Parameters
        ----------
        tables : VersionedTables
            The coordinator's tables, changed in place.
        agg : AggregateSum
            Per-row sums of the round.
        version : int
            The round being finished.

        Returns
        -------
        int
            Number of rows changed.
        """
        changed = 0
        for name, ts in agg.items():
            if ts.ids.size == 0:
                continue
            mean = ts.mean()
            table = tables.tables[name]
            if self.name == "sgd":
                step = self.lr * mean
            else:
                acc = self.state.setdefault(name, np.zeros(table.shape[0], dtype=np.float32))
                acc[ts.ids] += np.mean(mean.astype(np.float32) ** 2, axis=1)
                step = self.lr * mean / (np.sqrt(acc[ts.ids])[:, None] + self.eps)
            table[ts.ids] += step.astype(np.float32)
            tables.stamp(name, ts.ids, version)
            changed += int(ts.ids.size)
        tables.version = version
        return changed
