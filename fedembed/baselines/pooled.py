"""The ``pooled`` baseline: centralised training of the federation's architecture on everyone's data.

The upper bound a federation is compared with: one process sees every organisation's
training data and trains the very architecture the federation trains, one set of shared
tables and each organisation's own head, jointly on the union of their batches. A
"round" is one epoch over the pooled data, so the curves line up with the federated
modes' rounds. The recipe is the federation's, FedRep's knobs included: with
``head_epochs`` every evaluation is preceded by the head re-fit (each organisation's head
on its own batches, the shared tables frozen, :func:`refit_heads`) at the next round's
learning rate, as an organisation re-fits on the synced tables before it evaluates them
and trains on; with ``freeze_head`` the epoch then trains the tables only; ``prox_mu`` has no synced
value to pull towards here and is ignored, as in ``local``. The coordinator's step is kept
too: under the linear server steps a table whose server learning rate is not 1 (by
default the small tables, which move by half their sum) keeps that share of each epoch's
move (:meth:`fedembed.aggregate.ServerOptimizer.kept_shares`, Lookahead with one slow step
per epoch), as ``local`` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from fedembed.aggregate import ServerOptimizer
from fedembed.config import RunConfig
from fedembed.model import SplitModel
from fedembed.report import RunLog
from fedembed.stopping import Evaluations
from fedembed.tables import init_table
from fedembed.task import Task, task_loss, to_device
from fedembed.recipe import TrainConfig
from fedembed.train import (
    _table_optimizer, build_seeded, evaluate_splits, head_steps, keep_share_of_move, snapshot_tables,
)

log = logging.getLogger(__name__)


def refit_heads(
    tasks: list[Task], models: list[SplitModel], head_opt: torch.optim.Optimizer, recipe: TrainConfig,
    rng: np.random.Generator,
) -> int:
    """The FedRep head re-fit of a pooled round: every head on its organisation's batches, tables frozen.

    Each organisation contributes :func:`fedembed.train.head_steps` of its shuffled batches
    (``recipe.head_epochs`` of an epoch, as in its own re-fit); the steps of all of them
    are taken in one random order, as the pooled epoch's are.

    Returns
    -------
    int
        Head steps taken (0 with ``head_epochs`` 0).
    """
    steps = []
    for i, task in enumerate(tasks):
        want = head_steps(task, recipe)
        mine: list = []
        while len(mine) < want:
            mine += list(task.batches("train", recipe.batch_size, rng))
        steps += [(i, b) for b in mine[:want]]
    if not steps:
        return 0
    frozen = models[0].table_parameters()  # tied into every model
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for j in rng.permutation(len(steps)):
            org, batch = steps[j]
            head_opt.zero_grad(set_to_none=True)
            task_loss(tasks[org], models[org], to_device(batch, tasks[org].device)).backward()
            head_opt.step()
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
    return len(steps)


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
    # the coordinator's step, in one trajectory: a table stepped by half its sum keeps half of each epoch's move
    keep = ServerOptimizer.shares_of_run(cfg)
    for task, model in zip(tasks, models):
        model.to(task.device)
    runlog = RunLog(config=cfg.to_dict())
    evals = Evaluations(cfg.train.serve_best, cfg.train.patience)  # early stopping on validation
    rng = np.random.default_rng(cfg.seed)

    def refit_then_evaluate(after: int) -> None:
        # as an organisation does at the start of round after + 1: the re-fit (at that round's
        # head learning rate) on the tables it then evaluates, so the head evaluated (and
        # served) is fitted to the tables it is served with
        if cfg.train.head_epochs > 0:
            nxt = cfg.train.at_round(after + 1)
            for g in head_opt.param_groups:
                g["lr"] = nxt.head_lr
            refit_heads(tasks, models, head_opt, nxt, rng)
        for i in range(n):
            runlog.set_metrics(after, names[i], evals.record(after, names[i], evaluate_splits(tasks[i], models[i])))

    refit_then_evaluate(0)
    for round_ in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        entry = runlog.new_round(round_)
        recipe = cfg.train.at_round(round_)  # the same learning-rate schedule as the federated modes
        for opt, lr in ((head_opt, recipe.head_lr), (table_opt, recipe.table_lr)):
            for g in opt.param_groups:
                g["lr"] = lr
        steps = [(i, b) for i, t in enumerate(tasks) for b in t.batches("train", cfg.train.batch_size, rng)]
        start = snapshot_tables(models[0], keep)
        for j in rng.permutation(len(steps)):
            org, batch = steps[j]
            head_opt.zero_grad(set_to_none=True)
            table_opt.zero_grad(set_to_none=True)
            task_loss(tasks[org], models[org], to_device(batch, tasks[org].device)).backward()
            if not recipe.freeze_head:
                head_opt.step()
            table_opt.step()
        keep_share_of_move(models[0], start, keep)
        refit_then_evaluate(round_)
        if evals.end_round(runlog, entry, n, t0, on_round):
            break
    return runlog, models[0].get_tables()
