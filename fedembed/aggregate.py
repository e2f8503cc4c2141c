"""Server-side math: per-row weighted mean, server optimizer step, version stamps.

The aggregate of a round is a :class:`fedembed.sparse.AggregateSum` (from the plain path
or the secure path alike). Its per-row weighted mean is a pseudo-gradient that a server
optimizer applies to the touched rows only; every changed row is stamped with the round.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedembed.sparse import AggregateSum
from fedembed.tables import VersionedTables

if TYPE_CHECKING:
    from fedembed.config import RunConfig

log = logging.getLogger(__name__)

SERVER_OPTIMIZERS = ("sgd", "adagrad", "adam", "yogi", "sum")
#: The server optimizers whose step is linear in the round's deltas (their learning rate scales the move).
LINEAR = ("sgd", "sum")


@dataclass
class ServerOptimizer:
    """A server optimizer over row-sparse pseudo-gradients.

    Parameters
    ----------
    name : str
        ``sgd``: ``row += lr * mean_delta`` (``lr=1`` is plain FedAvg of the rows).
        ``sum`` (FedSubAvg-style per-row steps): ``row += lr * sum_i w_i delta_i / weight_cap``.
        With weights of 1 per organisation (``TrainConfig.max_row_weight = 1``, the
        default) a row moves by the sum of the deltas of the organisations that touched
        it: the weighted mean times their number. A row one organisation touches moves as
        under ``sgd``; a row ``k`` organisations share moves ``k`` times as far, as it would
        in centralised training, where every organisation's batches step it (the mean
        makes the shared rows, the ones federating is for, learn ``k`` times slower).
        ``adagrad``: row-wise Adagrad (one accumulator per row, the mean square of its
        pseudo-gradient): ``acc += mean(d**2)``; ``row += lr * d / (sqrt(acc) + eps)``.
        ``adam`` / ``yogi``: FedAdam / FedYogi (Reddi et al., 2021) with per-row state,
        stepped lazily like a sparse Adam (a row's state moves only in rounds that touch
        it): a first moment per entry ``m = b1 m + (1 - b1) d``, a second moment per row
        ``v = b2 v + (1 - b2) mean(d**2)`` (yogi: ``v -= (1 - b2) s sign(v - s)`` with
        ``s = mean(d**2)``), bias-corrected by the row's own step count;
        ``row += lr * m_hat / (sqrt(v_hat) + eps)``.
    lr : float
        Server learning rate.
    table_lr : dict[str, float]
        Per-table learning rates in place of ``lr`` (the coordinator gives the tables that
        carry the pooled normaliser ``RunConfig.pooled_server_lr``); other tables use ``lr``.
    eps : float
        Numerical floor of the adaptive optimizers.
    beta1, beta2 : float
        Moment decays of ``adam`` and ``yogi``.
    weight_cap : float
        The largest weight one organisation gives a row (``TrainConfig.max_row_weight``):
        ``sum`` counts an organisation's delta in full at that weight.
    state : dict[str, np.ndarray]
        Optimizer state per table (``<table>`` Adagrad accumulators; ``<table>.m``,
        ``<table>.v``, ``<table>.t`` for adam and yogi); saved in checkpoints.
    """

    name: str = "sgd"
    lr: float = 1.0
    table_lr: dict[str, float] = field(default_factory=dict)
    eps: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    weight_cap: float = 1.0
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose one of {SERVER_OPTIMIZERS}")
        rates = {"server learning rate": self.lr,
                 **{f"server learning rate of table {t!r}": v for t, v in self.table_lr.items()}}
        for what, lr in rates.items():
            if not lr > 0:
                raise ValueError(f"{what} must be > 0, got {lr}")
        if not self.weight_cap >= 1:
            raise ValueError(f"weight_cap must be >= 1, got {self.weight_cap}")

    @classmethod
    def for_run(cls, cfg: RunConfig, pooled: Collection[str]) -> ServerOptimizer:
        """The server optimizer of run ``cfg``, whose tables ``pooled`` carry the pooled normaliser.

        Under the linear steps (``sgd``, ``sum``) those tables step by
        ``cfg.pooled_server_lr``, the others by ``cfg.server_lr``: the one place a run's
        settings become its table steps (the coordinator and the ``fedavg-all`` baseline
        alike). ``pooled_server_lr`` is a share of a sum; an adaptive step (``adam``,
        ``yogi``, ``adagrad``) has no sum to take a share of, so there every table steps
        by ``cfg.server_lr``, the rate its user chose for it.
        """
        linear = cfg.server_optimizer in LINEAR
        return cls(cfg.server_optimizer, cfg.server_lr, weight_cap=cfg.train.max_row_weight,
                   table_lr={t: cfg.pooled_server_lr for t in pooled} if linear else {})

    @classmethod
    def shares_of_run(cls, cfg: RunConfig) -> dict[str, float]:
        """:meth:`kept_shares` of run ``cfg``'s tables under its own step (what ``pooled`` and ``local`` keep)."""
        shapes = cfg.federation.shapes()
        return cls.for_run(cfg, cfg.train.pooled_tables(shapes)).kept_shares(shapes)

    def kept_shares(self, tables: Collection[str]) -> dict[str, float]:
        """The share of an epoch's move of each table that a mode without a coordinator keeps.

        ``pooled`` and ``local`` train one trajectory, so the coordinator's step has no sum
        to act on; under the linear steps (``sgd``, ``sum``) its learning rate acts on the
        epoch's move instead: the table ends the epoch at ``start + lr * (end - start)``
        (Lookahead with one slow step per epoch). The adaptive steps have no such
        analogue and give nothing.

        Parameters
        ----------
        tables : collection of str
            The run's tables.

        Returns
        -------
        dict
            Table -> share, for the tables whose learning rate is not 1 (the others keep
            their whole move).
        """
        if self.name not in LINEAR:
            return {}
        shares = {t: self.table_lr.get(t, self.lr) for t in tables}
        return {t: lr for t, lr in shares.items() if lr != 1.0}

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
            lr = self.table_lr.get(name, self.lr)
            if self.name == "sgd":
                step = lr * mean
            elif self.name == "sum":  # every organisation's (capped) share of its delta, added up
                step = lr * (ts.weighted_delta / self.weight_cap).astype(np.float32)
            elif self.name == "adagrad":
                acc = self.state.setdefault(name, np.zeros(table.shape[0], dtype=np.float32))
                acc[ts.ids] += np.mean(mean.astype(np.float32) ** 2, axis=1)
                step = lr * mean / (np.sqrt(acc[ts.ids])[:, None] + self.eps)
            else:
                step = self._adaptive(name, table.shape, ts.ids, mean, lr)
            table[ts.ids] += step.astype(np.float32)
            tables.stamp(name, ts.ids, version)
            changed += int(ts.ids.size)
        tables.version = version
        return changed

    def _adaptive(self, name: str, shape: tuple[int, ...], ids: np.ndarray, d: np.ndarray, lr: float) -> np.ndarray:
        """The FedAdam / FedYogi step, at rate ``lr``, of rows ``ids`` with pseudo-gradient ``d`` (per-row state, lazy)."""
        m = self.state.setdefault(f"{name}.m", np.zeros(shape, dtype=np.float32))
        v = self.state.setdefault(f"{name}.v", np.zeros(shape[0], dtype=np.float32))
        t = self.state.setdefault(f"{name}.t", np.zeros(shape[0], dtype=np.int32))
        d = d.astype(np.float32)
        sq = np.mean(d**2, axis=1)
        t[ids] += 1
        m[ids] = self.beta1 * m[ids] + (1 - self.beta1) * d
        if self.name == "adam":
            v[ids] = self.beta2 * v[ids] + (1 - self.beta2) * sq
        else:  # yogi: the second moment moves towards sq additively, never by a factor
            v[ids] = v[ids] - (1 - self.beta2) * sq * np.sign(v[ids] - sq)
        steps = t[ids].astype(np.float64)
        m_hat = m[ids] / (1 - self.beta1**steps)[:, None]
        v_hat = v[ids] / (1 - self.beta2**steps)
        return (lr * m_hat / (np.sqrt(np.maximum(v_hat, 0.0))[:, None] + self.eps)).astype(np.float32)
