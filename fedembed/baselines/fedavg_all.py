"""The ``fedavg-all`` baseline: FedAvg of the whole model, shared table rows and heads alike.

What a federation that shares everything gets: every round each organisation starts from
the global tables and the global head, trains with the federation's recipe, and the
coordinator's step takes the same row-sparse, fixed-point weighted mean of the table
deltas as a ``fedembed`` round, while the heads are averaged weighted by each
organisation's training examples. It needs heads of one architecture: organisations whose
heads differ are refused, each named, before anything trains.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedembed.aggregate import ServerOptimizer
from fedembed.config import ConfigError, RunConfig
from fedembed.model import SplitModel
from fedembed.normaliser import narrow, upload_shapes
from fedembed.report import RunLog
from fedembed.secagg.vector import ValueScales, fixed_point_sum
from fedembed.stopping import Evaluations
from fedembed.tables import VersionedTables
from fedembed.task import Task
from fedembed.train import build_seeded, evaluate_splits, make_head_optimizer, round_rng, train_local

log = logging.getLogger(__name__)


def _numpy_head(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.head_state_dict().items()}


def average_heads(heads: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Weighted average of head parameters (weights: training examples; all zero: equal weights)."""
    weights = np.array([w for _, w in heads], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(heads))
    weights /= weights.sum()
    ref = heads[0][0]
    return {k: sum(h[k].astype(np.float64) * w for (h, _), w in zip(heads, weights)).astype(ref[k].dtype) for k in ref}


def check_heads_alike(models: list[SplitModel], names: list[str]) -> None:
    """Refuse a federation whose heads cannot be averaged: each must have the first one's parameters and shapes.

    Parameters
    ----------
    models : list of SplitModel
        Every organisation's model.
    names : list of str
        Their names, in the same order.

    Raises
    ------
    ConfigError
        Naming each organisation whose head differs, with (up to three of) the parameters that differ.
    """
    ref = {k: tuple(v.shape) for k, v in models[0].head_state_dict().items()}
    misfits = []
    for name, model in zip(names[1:], models[1:]):
        own = {k: tuple(v.shape) for k, v in model.head_state_dict().items()}
        if own != ref:
            diff = sorted(k for k in set(own) | set(ref) if own.get(k) != ref.get(k))
            misfits.append(f"{name} ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})")
    if misfits:
        raise ConfigError(
            f"fedavg-all averages heads, but these organisations' heads differ from {names[0]}'s: {'; '.join(misfits)}"
        )


def run_fedavg_all(
    cfg: RunConfig, tasks: list[Task], names: list[str], on_round: Callable[[dict], None] | None = None
) -> tuple[RunLog, dict[str, np.ndarray]]:
    """Run FedAvg of tables and heads; returns the run log and the final tables.

    Raises
    ------
    ConfigError
        An organisation's head differs in its parameters or their shapes from the first one's.
    """
    shapes = cfg.federation.shapes()
    models = [build_seeded(t, cfg.seed, n) for t, n in zip(tasks, names)]
    check_heads_alike(models, names)
    tables = VersionedTables.initial(shapes, cfg.seed, cfg.table_scale)
    head = _numpy_head(models[0])  # FedAvg starts every organisation from one model
    for task, model in zip(tasks, models):
        model.to(task.device)
    runlog = RunLog(config=cfg.to_dict())
    evals = Evaluations(cfg.train.serve_best, cfg.train.patience)  # early stopping on validation

    def load_global(model: Any, device: Any) -> None:
        model.set_tables(tables.tables)
        model.load_head_state_dict({k: torch.from_numpy(v).to(device) for k, v in head.items()})

    for task, model, name in zip(tasks, models, names):
        load_global(model, task.device)
        runlog.set_metrics(0, name, evals.record(0, name, evaluate_splits(task, model)))
    head_states: list[dict | None] = [None] * len(tasks)
    table_states: list[dict] = [{} for _ in tasks]
    pooled = cfg.train.pooled_tables(shapes)  # the tables whose uploads carry the pooled normaliser (every round)
    optimizer = ServerOptimizer.for_run(cfg, pooled)
    widths = upload_shapes(shapes, pooled)
    for round_ in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        entry = runlog.new_round(round_)
        recipe = cfg.train.at_round(round_)
        updates, heads = [], []
        for i, (task, model, name) in enumerate(zip(tasks, models, names)):
            load_global(model, task.device)
            head_opt = make_head_optimizer(model, recipe, head_states[i])
            update, stats = train_local(
                task, model, recipe, head_opt, round_rng(cfg.seed, name, round_), start_tables=tables.tables,
                table_state=table_states[i] if recipe.keep_table_state else None, delta_clip=cfg.delta_clip,
            )
            head_states[i] = head_opt.state_dict()
            updates.append(update)
            heads.append((_numpy_head(model), stats["examples"]))
        scales = ValueScales(n=len(updates), clip_delta=cfg.delta_clip, max_weight=cfg.train.max_row_weight)
        agg = fixed_point_sum(updates, widths, scales, cfg.wire_dtype)
        if pooled:
            agg = narrow(agg, cfg.delta_clip, pooled)
        entry["rows_changed"] = optimizer.step(tables, agg, round_)
        tables.version = round_
        head = average_heads(heads)
        for task, model, name in zip(tasks, models, names):
            load_global(model, task.device)
            runlog.set_metrics(round_, name, evals.record(round_, name, evaluate_splits(task, model)))
        if evals.end_round(runlog, entry, len(tasks), t0, on_round):
            break
    return runlog, tables.tables
