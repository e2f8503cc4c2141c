"""Local multi-organisation simulation on Flower's simulation engine (Ray).

:func:`simulate` runs one :class:`fedembed.config.RunConfig` end to end and writes
``metrics.json``, ``embeddings.npz`` and ``report.png`` into the output directory. The
baselines (``local``, ``fedavg-all``, ``pooled``) need no federation and run in this
process (:mod:`fedembed.baselines`).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from fedembed.config import ConfigError, RunConfig
from fedembed.report import RunLog
from fedembed.task import TaskSpec

log = logging.getLogger(__name__)


def simulate(
    cfg: RunConfig,
    tasks: list[TaskSpec],
    out_dir: Path,
    on_round: Callable[[dict], None] | None = None,
    num_cpus: int | None = None,
    audit: bool = False,
    client_mods: list | None = None,
    names: list[str] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    quiet: bool = False,
    sync: str = "auto",
) -> RunLog:
    """Run ``cfg`` as a local simulation and write its outputs.

    Parameters
    ----------
    cfg : RunConfig
        The run (what the coordinator knows: the federation spec, recipe, protocol).
    tasks : list[TaskSpec]
        One task per simulated organisation, each its own (:func:`fedembed.task.simulated_federation`).
    names : list[str], optional
        The organisations' roster names (default: the tasks' own names, or ``org-<i>``).
    device : str
        Where every simulated organisation trains (``cpu``, ``cuda``, ``auto``).
    threads : int, optional
        Torch CPU threads per organisation (default: torch's choice).
    sync : str
        Every simulated organisation's sync policy (:class:`fedembed.workingset.SyncPolicy`:
        ``auto``, ``full``, ``working-set``, ``padded``).
    quiet : bool
        Keep the simulation engine's (Ray's) worker output, such as its warnings at
        shutdown, off the console.
    out_dir : Path
        Output directory: ``metrics.json``, ``embeddings.npz``, ``report.png``, and
        ``state/`` (coordinator checkpoints, one private directory per organisation).
        A previous run's ``state/`` there is removed first.
    on_round : callable, optional
        Called with each round's log entry.
    num_cpus : int, optional
        CPUs Ray may use (default: all); each organisation's training takes one.
    audit : bool
        Record every byte each organisation sends in ``state/audit/org-<i>/``
        (:class:`fedembed.audit.AuditMod`).
    client_mods : list, optional
        More Flower ClientApp mods, innermost last (they see each reply after it is signed).

    Returns
    -------
    RunLog
        The run log (also written to ``metrics.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = out_dir / "state"
    if state.exists():
        log.info("removing the previous simulation state in %s", state)
        shutil.rmtree(state)
    from fedembed.task import load_task

    if names is None:
        loaded = [load_task(t) for t in tasks]
        names = [t.name or f"org-{i}" for i, t in enumerate(loaded)]
    if len(set(names)) != len(names) or len(names) != len(tasks):
        raise ValueError(f"one unique name per organisation, got {names} for {len(tasks)} tasks")
    if cfg.secure:
        from fedembed.secagg.protocol import SecurePolicy

        fewest = SecurePolicy().min_neighbours + 1
        if len(tasks) < fewest:  # every round would be abandoned at its share stage, and the run end "done"
            raise ConfigError(f"secure aggregation needs at least {fewest} organisations, got {len(tasks)}: each "
                              f"masks its update with at least {fewest - 1} neighbours (its policy's "
                              "secure-min-neighbours), so that no one else's update can be unmasked from its own")
    if cfg.mode != "fedembed":
        from fedembed.baselines import run_baseline
        from fedembed.task import resolve_device

        loaded = [load_task(t) for t in tasks]
        for task in loaded:
            task.device = resolve_device(device)
        if threads:
            import torch

            torch.set_num_threads(threads)
        runlog, tables = run_baseline(cfg, loaded, names, on_round)
        runlog.write(out_dir, tables)
        return runlog

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedembed.apps.client import make_client_app
    from fedembed.apps.server import make_server_app
    from fedembed.identity import make_identities

    # every simulated organisation gets its own identity key; the roster of their public
    # halves is the federation's (the coordinator attributes replies by it)
    keys = state / "keys"
    roster = make_identities(names, keys)
    roster_path = roster.write(state / "roster.json")
    cfg = cfg.with_roster(roster.to_dict())
    result: dict = {}

    def done(coordinator) -> None:
        result["coordinator"] = coordinator

    def failed(exc: BaseException) -> None:
        result["error"] = exc

    # every simulated organisation takes part from round 1: a round never starts with whoever came up first, and
    # (unless dropouts are injected) an organisation that fails fails the run, not a round without it
    server_app = make_server_app(cfg, state_dir=state / "coordinator", on_round=on_round, on_done=done,
                                 wait_for=len(tasks), strict=not cfg.drop, on_error=failed)
    client_app = make_client_app(
        str((state / "orgs").resolve()),
        str((state / "audit").resolve()) if audit else None,
        key_dir=str(keys.resolve()),
        roster=str(roster_path.resolve()),
        mods=client_mods,
        tasks=tasks,
        # DP noise repeats from --seed (each organisation mixes in its name): a simulation, not a deployment
        node_defaults={"device": device, "sync": sync, "dp-noise-seed": f"simulation/{cfg.seed}",
                       **({"threads": threads} if threads else {})},
    )
    cpus = num_cpus or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "error", "log_to_driver": not quiet},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not log.isEnabledFor(logging.DEBUG):
            flwr_logger.setLevel(logging.ERROR)  # Flower's own chatter, incl. its deprecation notice
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(tasks), backend_config=backend)
    flwr_logger.setLevel(level)
    if "error" in result:
        raise result["error"]
    if "coordinator" not in result:
        raise RuntimeError("the simulation ended before the coordinator finished; see the log above")
    coordinator = result["coordinator"]
    coordinator.log.write(out_dir, coordinator.tables.tables)
    return coordinator.log
