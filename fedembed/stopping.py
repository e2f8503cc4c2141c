"""Early stopping on validation: the best-validation state of each organisation, and when to stop.

Torch-free, so the coordinator (which decides when a run stops) never imports torch.

Every mode, the federation and each baseline alike, selects on the **validation** split
only: an organisation's served state is the one of its evaluation with the highest
``val_score`` so far (the earliest on ties), and what is reported for it is that
evaluation's metrics under ``best_<name>`` (``best_score``, ``best_val_score``, ...) with
``best_round``, the round whose state it is. The test split never enters a choice.

A run may also stop early (``TrainConfig.patience``): once no organisation's best
validation score has improved for ``patience`` rounds, further rounds cannot change what
anyone serves unless the models recover, and the run ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: The metric an evaluation is ranked by (higher is better).
SELECT_ON = "val_score"
#: Metrics of the best-validation evaluation reported under ``best_<name>``.
REPORTED = ("score", "val_score", "loss", "val_loss", "guard_weight")


def improves(value: float | None, best: float | None) -> bool:
    """Whether a validation score ``value`` beats ``best`` (strictly; a missing or NaN value never does)."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or value > best


def best_metrics(metrics: Mapping[str, float], round_: int) -> dict[str, float]:
    """``metrics`` as the best-validation record: ``best_<name>`` of :data:`REPORTED`, and ``best_round``."""
    out = {f"best_{k}": float(metrics[k]) for k in REPORTED if k in metrics}
    out["best_round"] = float(round_)
    return out


@dataclass
class BestTracker:
    """The best-validation evaluation of each organisation, fed one evaluation at a time.

    Attributes
    ----------
    best : dict
        Organisation -> ``best_*`` metrics of its best-validation evaluation so far.
    """

    best: dict[str, dict[str, float]] = field(default_factory=dict)

    def update(self, org: str, round_: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Take ``org``'s evaluation after ``round_``; returns ``metrics`` plus its best-so-far record.

        Parameters
        ----------
        org : str
            The organisation.
        round_ : int
            The round the evaluation follows (0: before training).
        metrics : Mapping
            Its metrics (``val_score`` ranks it).

        Returns
        -------
        dict
            ``metrics`` with ``best_*`` and ``best_round`` added (the served state's).
        """
        prior = self.best.get(org)
        if prior is None or improves(metrics.get(SELECT_ON), prior.get(f"best_{SELECT_ON}")):
            self.best[org] = best_metrics(metrics, round_)
        return {**metrics, **self.best[org]}


def stalled(history: Iterable[Mapping[str, Mapping[str, float]]], patience: int) -> bool:
    """Whether no organisation's validation score improved in the last ``patience`` evaluations.

    Parameters
    ----------
    history : iterable of mappings
        One mapping per evaluation, oldest first: organisation -> its metrics (with
        ``val_score``). An organisation missing from an evaluation has not improved in it.
    patience : int
        Evaluations without any improvement that stop a run; 0 never stops.

    Returns
    -------
    bool
        True once every organisation's best ``val_score`` is older than the last ``patience``
        evaluations (and there are more than ``patience`` of them).
    """
    if patience <= 0:
        return False
    evaluations = list(history)
    if len(evaluations) <= patience:
        return False
    best: dict[str, float] = {}
    last_gain: dict[str, int] = {}
    for i, metrics in enumerate(evaluations):
        for org, m in metrics.items():
            value = m.get(SELECT_ON)
            if improves(value, best.get(org)):
                best[org] = float(value)  # type: ignore[arg-type]
                last_gain[org] = i
    if not last_gain:
        return False
    return max(last_gain.values()) < len(evaluations) - patience


@dataclass
class Evaluations:
    """A one-process run's evaluations (the baselines'): best-validation records and the stop rule.

    Parameters
    ----------
    serve_best : bool
        Add each organisation's best-validation record to what :meth:`record` returns
        (``TrainConfig.serve_best``).
    patience : int
        ``TrainConfig.patience`` (0: never stop early).
    """

    serve_best: bool = True
    patience: int = 0
    tracker: BestTracker = field(default_factory=BestTracker)
    history: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    def record(self, round_: int, org: str, metrics: Mapping[str, float]) -> dict[str, float]:
        """Take ``org``'s evaluation after ``round_`` (in round order); returns what to log for it."""
        self.history.setdefault(int(round_), {})[org] = dict(metrics)
        return self.tracker.update(org, round_, metrics) if self.serve_best else dict(metrics)

    def stalled(self) -> bool:
        """No organisation improved on validation in the last ``patience`` evaluations."""
        return stalled((self.history[r] for r in sorted(self.history)), self.patience)

    def end_round(
        self, runlog: Any, entry: dict[str, Any], clients: int, started: float,
        on_round: Callable[[dict], None] | None,
    ) -> bool:
        """Close a baseline round's log entry (clients, wall seconds, progress); True when the run stops here.

        Parameters
        ----------
        runlog : fedembed.report.RunLog
            The run's log (``extra["stopped_early"]`` is set when it stops).
        entry : dict
            The round's entry.
        clients : int
            Organisations that trained in it.
        started : float
            ``time.perf_counter()`` at the start of the round.
        on_round : callable, optional
            Progress callback, called with the entry.
        """
        entry["clients"] = clients
        entry["wall_seconds"] = time.perf_counter() - started
        if on_round:
            on_round(entry)
        if not self.stalled():
            return False
        log.info("round %d: no organisation's validation score improved for %d rounds; stopping early",
                 entry["round"], self.patience)
        runlog.extra["stopped_early"] = entry["round"]
        return True
