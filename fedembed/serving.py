"""What an organisation serves: its serving policy, chosen after every evaluation.

A round's evaluation scores the shared model (the synced tables with the organisation's
private head). A :class:`ServingPolicy` then decides which model the organisation would
serve and returns that model's metrics, the ones it reports. Two policies ship:

- :class:`SharedOnly` (the default): the shared model itself;
- :class:`fedembed.guard.Guard` (``TrainConfig.guard``, opt-in): the shared model, a
  private local-only twin, or their blend, whichever validation favours. It trains the
  twin alongside, which doubles the organisation's local training and table memory.

Either is wrapped by :class:`BestValidation` (``TrainConfig.serve_best``, on by default):
early stopping on validation. The organisation serves the state of its evaluation with the
best validation score so far (:mod:`fedembed.stopping`), reported under ``best_*`` with
``best_round`` next to the metrics of the latest evaluation; with
``TrainConfig.keep_best_state`` it also keeps that state's head and tables in
``<state_dir>/best`` (a full copy of the tables at each improvement).

A policy never changes what is uploaded: the shared model trains and sends its row deltas
whatever is served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from torch import nn

from fedembed.recipe import TrainConfig
from fedembed.stopping import BestTracker
from fedembed.store import OrgState, atomic_write
from fedembed.task import Task

log = logging.getLogger(__name__)


@dataclass
class ServingContext:
    """Where a serving decision is taken.

    Attributes
    ----------
    task : Task
        The organisation's task.
    cfg : TrainConfig
        The round's recipe.
    round : int
        The round whose stage this is.
    seed : int
        The run's seed.
    table_scale : float
        Standard deviation of the seeded version-0 tables.
    run_key : str
        Identifies the run (state of another run is discarded).
    shapes : dict
        ``(rows, dim)`` of the shared tables.
    train : bool
        A training stage (False: the closing evaluation).
    who : str
        The organisation's name.
    kept_shares : dict
        Table -> share of an epoch's move the coordinator's step keeps, where it is not 1
        (:meth:`fedembed.config.RoundPlan.shares`): a private twin trained as the ``local``
        baseline steps its tables so.
    """

    task: Task
    cfg: TrainConfig
    round: int
    seed: int
    table_scale: float
    run_key: str
    shapes: dict[str, tuple[int, int]]
    train: bool
    who: str
    kept_shares: dict[str, float] = field(default_factory=dict)


class ServingPolicy(Protocol):
    """Chooses what the organisation serves after an evaluation."""

    name: str

    def serve(self, ctx: ServingContext, shared_model: nn.Module, shared_metrics: dict[str, float]) -> dict[str, float]:
        """The metrics of the model served this round (the shared model's are ``shared_metrics``)."""
        ...


class SharedOnly:
    """Serve the shared model: the synced tables with the organisation's private head."""

    name = "shared"

    def serve(self, ctx: ServingContext, shared_model: nn.Module, shared_metrics: dict[str, float]) -> dict[str, float]:  # noqa: D102
        return shared_metrics



class BestValidation:
    """Early stopping on validation: serve the best-validation state seen so far.

    Wraps the policy that picks a round's candidate (``inner``): its metrics are reported
    as they are, plus the ``best_*`` metrics and ``best_round`` of the best-validation
    evaluation so far (:class:`fedembed.stopping.BestTracker`; ties to the earlier one).
    The record survives restarts in ``<state_dir>/best/best.json``, keyed by the run.

    Parameters
    ----------
    inner : ServingPolicy
        Chooses what a round serves (:class:`SharedOnly` or the guard).
    state_dir : Path
        The organisation's own state directory.
    keep : bool
        Keep the served state's head and tables in ``<state_dir>/best`` (the
        organisation's own choice; the recipe's ``keep_best_state`` also turns it on).
    """

    def __init__(self, inner: ServingPolicy, state_dir: Path, keep: bool = False) -> None:
        self.inner = inner
        self.keep = bool(keep)
        self.name = f"best-{inner.name}"
        self.dir = Path(state_dir) / "best"
        self.path = self.dir / "best.json"

    def _load(self, key: str) -> BestTracker:
        if not self.path.exists():
            return BestTracker()
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("best-validation record %s unreadable (%s); starting afresh", self.path, exc)
            return BestTracker()
        if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("best"), dict):
            return BestTracker()
        return BestTracker({"self": {k: float(v) for k, v in doc["best"].items()}})

    def serve(self, ctx: ServingContext, shared_model: nn.Module, shared_metrics: dict[str, float]) -> dict[str, float]:
        """The inner policy's metrics with the best-validation record (the served state's) added."""
        metrics = self.inner.serve(ctx, shared_model, shared_metrics)
        tracker = self._load(ctx.run_key)
        before = dict(tracker.best.get("self", {}))
        out = tracker.update("self", ctx.round - 1, metrics)  # the evaluation of the tables after round - 1
        if tracker.best["self"] != before:
            OrgState(self.dir)  # the directory, private
            atomic_write(self.path, json.dumps({"key": ctx.run_key, "best": tracker.best["self"]}).encode())
            if (ctx.cfg.keep_best_state or self.keep) and self.inner.name == SharedOnly.name:
                self._snapshot(ctx, shared_model)
        return out

    def _snapshot(self, ctx: ServingContext, model: nn.Module) -> None:
        """Keep the served state (head and tables) in ``<state_dir>/best``."""
        state = OrgState(self.dir)
        state.save_head(model.head_state_dict(), {}, ctx.round - 1)  # type: ignore[operator]
        state.save_tables(model.get_tables(), ctx.round - 1, ctx.run_key)  # type: ignore[operator]

