"""The per-organisation guard: use the shared table only where it helps, judged on validation.

When organisations' tasks differ, the shared table is pulled towards whichever task
dominates it, and a minority organisation's head may do worse on it than on a table of its
own. The guard lets each organisation find that out on its own **validation** data, round
by round, and fall back where sharing does not pay:

- candidate ``shared``: the federated model (shared tables, with the private residual of
  :mod:`fedembed.residual` when ``TrainConfig.residual`` is on, and the private head). It
  is trained and uploads its row deltas every round whatever the guard chooses, so the
  federation never loses an organisation's data;
- candidate ``local``: a private *twin* trained on the organisation's own data alone
  (its own table and head, kept in ``<state_dir>/guard``, never uploaded), trained by
  :func:`fedembed.train.train_alone` from the same seeded tables and head as the
  ``local`` baseline (:mod:`fedembed.baselines.local`), so it *is* that baseline, run
  inside the organisation: on a table whose server learning rate is not 1, both keep that
  share of each epoch's move (the coordinator's step in one trajectory; the plan says
  which, :meth:`fedembed.config.RoundPlan.shares`, and it touches nothing but the twin).

With ``TrainConfig.guard_blend`` a third candidate, ``blend``, serves the mean of the two
models' outputs (logits), so an organisation whose shared model and twin are each good at
different things gets both.

At every evaluation every candidate is scored on the validation split; the guard keeps
the last ``TrainConfig.guard_window`` validation scores of each and serves the candidate
with the highest mean (ties go to the one leaning more on the shared table). The metrics
an organisation reports (``score``, ``loss``, ``val_*``) are those of the served
candidate; ``guard_weight`` (the shared model's weight in what is served: 1, 0.5 or 0),
``guard_local`` (1.0 when the twin alone is served) and every candidate's
``<name>_val_score`` are reported alongside so the choice can be audited. The test split
never enters the choice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedembed.model import SplitModel
from fedembed.store import OrgState, atomic_write
from fedembed.task import Task
from fedembed.recipe import TrainConfig
from fedembed.serving import ServingContext
from fedembed.train import build_seeded, evaluate_splits, train_alone

log = logging.getLogger(__name__)

SHARED, BLEND, LOCAL = "shared", "blend", "local"
#: The shared model's weight in each candidate's output, in order of preference on ties.
WEIGHTS = {SHARED: 1.0, BLEND: 0.5, LOCAL: 0.0}


class Blend(nn.Module):
    """``w * shared(x) + (1 - w) * twin(x)``: a weighted mean of two models' outputs.

    Parameters
    ----------
    shared, twin : nn.Module
        The two models; called with the same arguments.
    weight : float
        Weight of ``shared``.
    """

    def __init__(self, shared: nn.Module, twin: nn.Module, weight: float) -> None:
        super().__init__()
        self.shared, self.twin, self.weight = shared, twin, float(weight)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: D102
        return self.weight * self.shared(*args, **kwargs) + (1.0 - self.weight) * self.twin(*args, **kwargs)


def choose(history: list[dict[str, float]], window: int) -> str:
    """The candidate to serve, from the validation scores of the last ``window`` evaluations.

    Parameters
    ----------
    history : list of dict
        One entry per evaluation, oldest first, mapping candidate names (``shared``,
        ``local``, optionally ``blend``) to their validation scores (higher is better).
    window : int
        How many of the latest evaluations are averaged (smooths a small validation set).

    Returns
    -------
    str
        The candidate with the highest mean; on ties, the one with the larger shared weight.
    """
    recent = history[-max(int(window), 1) :]
    if not recent:
        return SHARED
    names = [n for n in WEIGHTS if all(n in h for h in recent)]
    means = {n: float(np.mean([h[n] for h in recent])) for n in names}
    return max(names, key=lambda n: (means[n], WEIGHTS[n]))


class Guard:
    """An organisation's guard and its private local twin: a :class:`fedembed.serving.ServingPolicy`.

    Parameters
    ----------
    state_dir : Path
        The organisation's own state directory; the guard keeps its twin and history in
        ``state_dir / "guard"``.
    """

    name = "guard"

    def __init__(self, state_dir: Path) -> None:
        self.state = OrgState(Path(state_dir) / "guard")
        self.history_path = self.state.dir / "history.json"

    def serve(self, ctx: ServingContext, shared_model: nn.Module, shared_metrics: dict[str, float]) -> dict[str, float]:
        """The :class:`fedembed.serving.ServingPolicy` call (see :meth:`step`)."""
        return self.step(
            ctx.task, ctx.cfg, shared_metrics, ctx.round, ctx.seed, ctx.table_scale, ctx.run_key, ctx.shapes,
            train=ctx.train, evaluate=lambda t, m: evaluate_splits(t, m), shared_model=shared_model, who=ctx.who,
            kept_shares=ctx.kept_shares,
        )

    # ------------------------------------------------------------------ state
    def _history(self, key: str) -> list[dict[str, float]]:
        if not self.history_path.exists():
            return []
        try:
            doc = json.loads(self.history_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("guard history %s unreadable (%s); starting afresh", self.history_path, exc)
            return []
        return list(doc.get("history", [])) if doc.get("key") == key else []

    def _save_history(self, key: str, history: list[dict[str, float]]) -> None:
        atomic_write(self.history_path, json.dumps({"key": key, "history": history}).encode())

    def _twin(
        self, task: Task, shapes: dict[str, tuple[int, int]], seed: int, scale: float, key: str, who: str
    ) -> tuple[SplitModel, dict | None]:
        """The twin model at its latest state (a fresh one at the start of a run)."""
        tables, version = self.state.load_tables(shapes, seed, scale, key)
        model = build_seeded(task, seed, who)
        model.set_tables(tables)
        saved = self.state.load_head(model) if version > 0 else None  # a foreign head.pt is set aside
        if saved is not None:
            model.load_head_state_dict(saved["head"])
        return model.to(task.device), saved

    # ------------------------------------------------------------------ a stage
    def step(
        self,
        task: Task,
        cfg: TrainConfig,
        shared_metrics: dict[str, float],
        round_: int,
        seed: int,
        scale: float,
        run_key: str,
        shapes: dict[str, tuple[int, int]],
        train: bool,
        evaluate: Callable[[Task, nn.Module], dict[str, float]],
        shared_model: nn.Module | None = None,
        who: str = "",
        kept_shares: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Evaluate the twin, choose on validation, train the twin; returns the metrics to report.

        Parameters
        ----------
        task : Task
            The organisation's task.
        cfg : TrainConfig
            The recipe (the twin trains with the same one).
        shared_metrics : dict
            The shared candidate's metrics at this evaluation (``val_score`` needed).
        round_ : int
            The round of this stage (the twin is trained with that round's shuffling).
        seed, scale : int, float
            Run seed and version-0 table scale (the twin starts where ``local`` would).
        run_key : str
            Identifies the run; a twin of another run is discarded.
        shapes : dict
            ``(rows, dim)`` of the shared tables.
        train : bool
            Train the twin after evaluating (False for the closing evaluation).
        evaluate : callable
            ``evaluate(task, model) -> metrics`` with ``val_*`` and test keys.
        shared_model : nn.Module, optional
            The shared candidate's model, needed for the ``blend`` candidate.
        who : str
            The organisation's name: seeds the twin's initial head and its shuffling
            (:func:`fedembed.train.round_rng`) as the ``local`` baseline's.
        kept_shares : dict, optional
            Table -> share of each epoch's move the twin keeps (the coordinator's step, as
            the ``local`` baseline keeps it); None: the whole move.

        Returns
        -------
        dict
            The served candidate's metrics, plus ``guard_weight``, ``guard_local`` and
            ``<candidate>_val_score``.
        """
        key = run_key + "|local"  # the same cache key, init and shuffling as the local baseline
        model, saved = self._twin(task, shapes, seed, scale, key, who)
        candidates = {SHARED: shared_metrics, LOCAL: evaluate(task, model)}
        if cfg.guard_blend and shared_model is not None:
            candidates[BLEND] = evaluate(task, Blend(shared_model, model, WEIGHTS[BLEND]))
        history = self._history(run_key)
        history.append({n: float(m["val_score"]) for n, m in candidates.items()})
        self._save_history(run_key, history)
        served = choose(history, cfg.guard_window)
        out = dict(candidates[served])
        out["guard_weight"] = WEIGHTS[served]
        out["guard_local"] = 1.0 if served == LOCAL else 0.0
        for n, m in candidates.items():
            out[f"{n}_val_score"] = float(m["val_score"])
        if train:  # the twin never leaves the organisation: it trains without DP noise
            state = train_alone(task, model, replace(cfg, dp_noise_multiplier=0.0), saved, seed, who, round_,
                                kept_shares)
            extra = {"table_state": state["table_state"]} if "table_state" in state else {}
            self.state.save_head(state["head"], state["optimizer"], round_, **extra)
            self.state.save_tables(model.get_tables(), round_, key)
        return out
