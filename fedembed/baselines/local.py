"""The ``local`` baseline: every organisation trains alone, its own table and its own head.

What an organisation gets without any federation: the same model, recipe, seeds and
batches as in a ``fedembed`` run, but its shared tables never leave it and never take in
anyone else's rows. The coordinator's step is kept as in ``pooled``: a table whose server
learning rate is not 1 keeps that share of each epoch's move (a federation of one). The
guard's private twin (:mod:`fedembed.guard`) is trained by the very same function,
:func:`fedembed.train.train_alone`, with the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fedembed.aggregate import ServerOptimizer
from fedembed.config import RunConfig
from fedembed.dp.accounting import PrivacyLedger
from fedembed.report import RunLog
from fedembed.stopping import Evaluations
from fedembed.tables import init_table
from fedembed.task import Task
from fedembed.train import build_seeded, evaluate_splits, train_alone

log = logging.getLogger(__name__)


def run_local(
    cfg: RunConfig, tasks: list[Task], names: list[str], on_round: Callable[[dict], None] | None = None
) -> RunLog:
    """Train each organisation on its own data for ``cfg.rounds`` rounds; returns the run log.

    Parameters
    ----------
    cfg : RunConfig
        The run (recipe, seed, rounds, table initialisation).
    tasks : list[Task]
        Every organisation's own task, on its device.
    names : list[str]
        Their names (they seed each organisation's head and shuffling).
    on_round : callable, optional
        Called with each round's log entry.
    """
    runlog = RunLog(config=cfg.to_dict())
    evals = Evaluations(cfg.train.serve_best, cfg.train.patience)  # early stopping on validation
    shapes = cfg.federation.shapes()
    models = []
    for task, name in zip(tasks, names):
        model = build_seeded(task, cfg.seed, name)
        model.set_tables({t: init_table(t, s, cfg.seed, cfg.table_scale) for t, s in shapes.items()})
        model.to(task.device)
        models.append(model)
        runlog.set_metrics(0, name, evals.record(0, name, evaluate_splits(task, model)))
    saved: list[dict[str, Any] | None] = [None] * len(tasks)
    # the coordinator's step, in one trajectory: a table stepped by half its sum keeps half of each epoch's move
    keep = ServerOptimizer.shares_of_run(cfg)
    for round_ in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        entry = runlog.new_round(round_)
        recipe = cfg.train.at_round(round_)
        for i, (task, model, name) in enumerate(zip(tasks, models, names)):
            saved[i] = train_alone(task, model, recipe, saved[i], cfg.seed, name, round_, keep)
            runlog.set_metrics(round_, name, evals.record(round_, name, evaluate_splits(task, model)))
            if "dp_ledger" in saved[i]:  # the same DP as in a federation: its spend, as fedembed mode reports it
                eps, delta = PrivacyLedger.from_dict(saved[i]["dp_ledger"]).spent()
                entry.setdefault("privacy", {})[name] = {"epsilon": eps, "delta": delta}
        if evals.end_round(runlog, entry, len(tasks), t0, on_round):
            break
    return runlog
