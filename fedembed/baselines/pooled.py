"""The ``pooled`` baseline: centralised training of the federation's architecture on everyone's data.

The upper bound a federation is compared with: one process sees every organisation's
training data and trains the very architecture the federation trains, one set of shared
tables and each organisation's own head, jointly on the union of their batches. A
"round" is one epoch over the pooled data, so the curves line up with the federated
modes' rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from fedembed.config import RunConfig
from fedembed.model import SplitModel
from fedembed.report import RunLog
from fedembed.stopping import Evaluations
from fedembed.tables import init_table
from fedembed.task import Task, to_device
from fedembed.train import _table_optimizer, build_seeded, evaluate_splits

log = logging.getLogger(__name__)


def run_pooled(
    cfg: RunConfig, tasks: list[Task], names: list[str], on_round: Callable[[dict], None] | None = None
) -> tuple[RunLog, dict[str, np.ndarray]]:
    """Train centrally on all organisations' data; returns the run log and final tables.

    Parameters
    ----------
    cfg : RunConfig
        The run (``mode`` is ``pooled``).
    tasks : list[Task]
        Every organisation's task (its data, model and head).
    names : list[str]
        Their names in the run log.
    on_round : callable, optional
        Progress callback per round.
    """
    n = len(tasks)
    models: list[SplitModel] = [build_seeded(t, cfg.seed, name) for t, name in zip(tasks, names)]
    tables = {name: init_table(name, s, cfg.seed, cfg.table_scale) for name, s in cfg.federation.shapes().items()}
    models[0].set_tables(tables)
    for m in models[1:]:  # tie every organisation's tables to model 0's; heads stay each its own
        for name in m.table_names:
            m.table(name).weight = models[0].table(name).weight
    shared = {id(p) for p in models[0].table_parameters()}  # tied into every model: not a head parameter
    heads = {id(p): p for m in models for p in m.head_parameters() if id(p) not in shared}
    head_opt = torch.optim.AdamW(list(heads.values()), lr=cfg.train.head_lr, weight_decay=cfg.train.head_weight_decay)
    table_opt = _table_optimizer(models[0], cfg.train)
    for task, model in zip(tasks, models):
        model.to(task.device)
    runlog = RunLog(config=cfg.to_dict())
    evals = Evaluations(cfg.train.serve_best, cfg.train.patience)  # early stopping on validation
    for i in range(n):
        runlog.set_metrics(0, names[i], evals.record(0, names[i], evaluate_splits(tasks[i], models[i])))
    rng = np.random.default_rng(cfg.seed)
    for round_ in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        entry = runlog.new_round(round_)
        recipe = cfg.train.at_round(round_)  # the same learning-rate schedule as the federated modes
        for opt, lr in ((head_opt, recipe.head_lr), (table_opt, recipe.table_lr)):
            for g in opt.param_groups:
                g["lr"] = lr
        steps = [(i, b) for i, t in enumerate(tasks) for b in t.batches("train", cfg.train.batch_size, rng)]
        for j in rng.permutation(len(steps)):
            org, batch = steps[j]
            head_opt.zero_grad(set_to_none=True)
            table_opt.zero_grad(set_to_none=True)
            tasks[org].loss(models[org], to_device(batch, tasks[org].device)).backward()
            head_opt.step()
            table_opt.step()
        for i in range(n):
            runlog.set_metrics(round_, names[i], evals.record(round_, names[i], evaluate_splits(tasks[i], models[i])))
        if evals.end_round(runlog, entry, n, t0, on_round):
            break
    return runlog, models[0].get_tables()
