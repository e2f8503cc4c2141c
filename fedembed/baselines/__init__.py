"""Baselines a federation is compared with, each run in one process, outside the privacy path.

A baseline is not a federation: it needs no coordinator, no message and no wire record,
so none of them is a mode of :class:`fedembed.coordinator.Coordinator` or of
:class:`fedembed.org.Organisation` (whose messages have no place for a head). Each takes
the simulated organisations' own tasks and trains what it compares with:

- ``local`` (:mod:`fedembed.baselines.local`): each organisation alone, its own table and head;
- ``fedavg-all`` (:mod:`fedembed.baselines.fedavg_all`): FedAvg of everything, table rows
  *and* heads (organisations with identical heads only);
- ``pooled`` (:mod:`fedembed.baselines.pooled`): the federation's own architecture (one
  shared table, each organisation its head) trained centrally on the union of the data.

They share the federation's recipe, seeds, batches and evaluation, so their metrics line up
with a ``fedembed`` run's round by round (round 0: before training).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedembed.config import ConfigError, RunConfig
from fedembed.report import RunLog
from fedembed.task import Task

BASELINES = ("local", "fedavg-all", "pooled")


def run_baseline(
    cfg: RunConfig, tasks: list[Task], names: list[str], on_round: Callable[[dict], None] | None = None
) -> tuple[RunLog, dict[str, np.ndarray] | None]:
    """Run the baseline ``cfg.mode`` on the organisations' tasks.

    Parameters
    ----------
    cfg : RunConfig
        The run; ``cfg.mode`` names the baseline.
    tasks : list[Task]
        Every organisation's own task (its data, model and head), on its device.
    names : list[str]
        Their names in the run log.
    on_round : callable, optional
        Called with each round's log entry.

    Returns
    -------
    RunLog, dict or None
        The run log and the final shared tables (None for ``local``: nothing is shared).

    Raises
    ------
    ConfigError
        ``cfg.mode`` is not a baseline, or the tasks cannot run it.
    """
    if len(tasks) != len(names) or not tasks:
        raise ConfigError(f"one name per organisation's task, got {len(names)} names for {len(tasks)} tasks")
    if cfg.mode == "local":
        from fedembed.baselines.local import run_local

        return run_local(cfg, tasks, names, on_round), None
    if cfg.mode == "fedavg-all":
        from fedembed.baselines.fedavg_all import run_fedavg_all

        return run_fedavg_all(cfg, tasks, names, on_round)
    if cfg.mode == "pooled":
        from fedembed.baselines.pooled import run_pooled

        return run_pooled(cfg, tasks, names, on_round)
    raise ConfigError(f"{cfg.mode!r} is not a baseline: one of {BASELINES}")
