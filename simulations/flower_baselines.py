"""Flower 1.42's own anchors for the benchmark: dense FedAvg and legacy SecAgg+.

Both run on Flower's simulation engine with the very same local work as fedembed's
organisations: each ClientApp builds the organisation's split model from the same
:class:`fedembed.task.TaskSpec` (``Workload.org_task``), loads the received dense table, runs
:func:`fedembed.train.train_local` with the same recipe and the same per-round seed as
:class:`fedembed.org.Organisation` (so round 1's update vectors are identical), and
replies with the dense float32 table ``received + densified row-sparse delta``. The private
head stays in the node's ``context.state``.

- ``flower-fedavg``: Message API ``flwr.serverapp.strategy.FedAvg`` (one ``ArrayRecord``
  with the float32 table down and up).
- ``flower-secaggplus``: the legacy API, ``flwr.server.ServerApp`` + ``LegacyContext`` +
  ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` and
  ``flwr.client.ClientApp(client_fn, mods=[secaggplus_mod])``.

What is measured (:class:`MeteredGrid`): the serialized size of every message content
down and up (:func:`fedembed.wire.record_bytes`, the same function fedembed's coordinator
uses) and the time of every ``send_and_receive`` call, labelled by stage; the time spent
measuring sizes is subtracted from the stage it happened in.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedembed.wire import record_bytes
from simulations.proctree import tree_cpu_seconds

log = logging.getLogger(__name__)

SECAGG_STAGE_NAMES = {"setup": "setup", "share_keys": "share", "collect_masked_vectors": "masked", "unmask": "unmask"}


# --------------------------------------------------------------------------- metering


@dataclass
class Call:
    """One ``send_and_receive`` of the ServerApp: stage, start time, bytes, metering time."""

    stage: str
    t0: float
    messages: int
    replies: int
    down: int
    up: int
    meter_seconds: float
    cpu0: float = 0.0


@dataclass
class Meter:
    """Every exchange of one run, in order, and the end time of the run."""

    calls: list[Call] = field(default_factory=list)
    t_end: float | None = None
    cpu_end: float | None = None

    def rounds(self, first_stage: str) -> list[dict[str, Any]]:
        """Per-round entries shaped like fedembed's metrics.json rounds.

        A round starts with a call of ``first_stage``; a stage lasts from its call until
        the next call (server-side work after the replies included), minus metering.
        """
        if not self.calls:
            return []
        ends = [c.t0 for c in self.calls[1:]] + [self.t_end if self.t_end is not None else time.perf_counter()]
        cpu_ends = [c.cpu0 for c in self.calls[1:]] + [self.cpu_end if self.cpu_end is not None else self.calls[-1].cpu0]
        out: list[dict[str, Any]] = []
        for call, end, cpu_end in zip(self.calls, ends, cpu_ends):
            if call.stage == first_stage or not out:
                out.append({"round": len(out) + 1, "upload_bytes": 0, "download_bytes": 0, "clients": 0,
                            "wall_seconds": 0.0, "cpu_seconds": 0.0, "stages": {}})
            r = out[-1]
            secs = max(end - call.t0 - call.meter_seconds, 0.0)
            r["cpu_seconds"] += max(cpu_end - call.cpu0 - call.meter_seconds, 0.0)
            st = r["stages"].setdefault(call.stage, {"seconds": 0.0, "upload_bytes": 0, "download_bytes": 0})
            st["seconds"] += secs
            st["upload_bytes"] += call.up
            st["download_bytes"] += call.down
            r["upload_bytes"] += call.up
            r["download_bytes"] += call.down
            r["wall_seconds"] += secs
            if call.stage == first_stage:
                r["clients"] = call.replies
        return out


@contextmanager
def _deflate_once() -> Iterator[None]:
    """Within the block, each ``ConfigRecord`` is deflated once, not once per ancestor.

    ``record_bytes`` walks the object tree and every level re-deflates its children to
    get their ids; for SecAgg+'s 512 MB masked vector carried as bytes in a ConfigRecord
    that costs ~85 s per reply. The sizes are unchanged (checked by the smoke test); only
    the metering gets cheaper. Used on the ServerApp thread only, around the metering.
    """
    from flwr.app import ConfigRecord

    original = ConfigRecord.deflate
    cache: dict[int, tuple[Any, bytes]] = {}

    def deflate(self: Any) -> bytes:
        hit = cache.get(id(self))
        if hit is None or hit[0] is not self:
            hit = cache[id(self)] = (self, original(self))
        return hit[1]

    ConfigRecord.deflate = deflate  # type: ignore[method-assign]
    try:
        yield
    finally:
        ConfigRecord.deflate = original  # type: ignore[method-assign]


def content_bytes(content: Any) -> int:
    """:func:`fedembed.wire.record_bytes` of ``content``, with ConfigRecords deflated once."""
    with _deflate_once():
        return record_bytes(content)


def _make_metered_grid(grid: Any, meter: Meter, stage_of: Any) -> Any:
    """A ``Grid`` that forwards everything to ``grid`` and records each exchange in ``meter``."""
    from flwr.serverapp import Grid

    class MeteredGrid(Grid):
        """Forwards to the real Grid; records sizes and times of each ``send_and_receive``."""

        def __init__(self) -> None:
            self._inner = grid

        def set_run(self, run: Any) -> None:  # noqa: D102
            self._inner.set_run(run)

        @property
        def run(self) -> Any:  # noqa: D102
            return self._inner.run

        def create_message(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
            return self._inner.create_message(*args, **kwargs)

        def get_node_ids(self) -> Iterable[int]:  # noqa: D102
            return self._inner.get_node_ids()

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:  # noqa: D102
            return self._inner.push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:  # noqa: D102
            return self._inner.pull_messages(message_ids)

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            messages = list(messages)
            if not messages:  # e.g. FedAvg's skipped evaluation: nothing is sent
                return self._inner.send_and_receive(messages, timeout=timeout)
            t0 = time.perf_counter()
            cpu0 = tree_cpu_seconds()
            stage = stage_of(messages[0])
            down = sum(content_bytes(m.content) for m in messages)
            meter_s = time.perf_counter() - t0
            replies = list(self._inner.send_and_receive(messages, timeout=timeout))
            t1 = time.perf_counter()
            ok = [r for r in replies if not r.has_error()]
            up = sum(content_bytes(r.content) for r in ok)
            meter_s += time.perf_counter() - t1
            meter.calls.append(Call(stage, t0, len(messages), len(ok), down, up, meter_s, cpu0))
            return replies

    return MeteredGrid()


# --------------------------------------------------------------------------- local work


@dataclass
class Workload:
    """The benchmark workload, shared by every method (JSON-able)."""

    rows: int
    dim: int
    orgs: int
    touch: float
    seed: int
    rounds: int
    shares: int
    threshold: int
    """``shares``: Flower's ``num_shares`` (the owner's own share included), i.e. fedembed's
    neighbourhood size k = shares - 1; ``threshold``: Shamir's t, the same for both."""

    def task_options(self) -> dict[str, Any]:
        """Options of the synthetic task (every organisation's; :meth:`org_task` adds its own ``org``)."""
        return {"orgs": self.orgs, "rows": self.rows, "dim": self.dim, "touch": self.touch, "seed": self.seed}

    def org_task(self, org: int) -> Any:
        """Organisation ``org``'s own task spec, as a fedembed simulation gives it (:meth:`TaskSpec.for_org`)."""
        from fedembed.task import TaskSpec

        return TaskSpec("synthetic", self.task_options()).for_org(org, self.orgs)


def bench_train_config() -> Any:
    """The local recipe of every method in the benchmark, pinned so that it does not follow
    the library's defaults: batch 64, sparse Adam, one epoch; no guard twin (a second,
    private model per organisation, unrelated to aggregation) and no table-optimizer
    state kept across rounds, which the Flower clients do not have either."""
    from fedembed.recipe import TrainConfig

    return TrainConfig(batch_size=64, guard=False, keep_table_state=False)


def dense_local_update(
    work: Workload, org: int, table: np.ndarray, round_: int, head: dict[str, np.ndarray] | None
) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """Train organisation ``org`` from the dense ``table`` as fedembed would; densify the update.

    Returns
    -------
    new_table : np.ndarray
        ``table`` plus the organisation's row-sparse delta, float32.
    examples : float
        Its training examples (the FedAvg weight).
    head : dict
        Its head parameters after training (kept in the node's state).
    """
    import torch

    from fedembed.task import load_task
    from fedembed.train import make_head_optimizer, train_local

    torch.set_num_threads(1)
    task = load_task(work.org_task(org))
    cfg = bench_train_config()
    model = task.build_model()
    model.set_tables({"ids": table})
    if head is not None:
        model.load_head_state_dict({k: torch.from_numpy(v) for k, v in head.items()})
    head_opt = make_head_optimizer(model, cfg, None)
    rng = np.random.default_rng([work.seed, org, round_])  # as fedembed.org.Organisation
    update, stats = train_local(task, model, cfg, head_opt, rng, start_tables={"ids": table})
    tu = update["ids"]
    new = np.array(table, dtype=np.float32, copy=True)
    new[tu.ids] += tu.delta
    head_out = {k: v.detach().numpy().copy() for k, v in model.head_state_dict().items()}
    return new, float(stats["examples"]), head_out


def _head_from_state(state: Any) -> dict[str, np.ndarray] | None:
    if "bench.head" not in state.array_records:
        return None
    return {k: v.numpy() for k, v in state.array_records["bench.head"].items()}


def _head_to_state(state: Any, head: dict[str, np.ndarray]) -> None:
    from flwr.app import Array, ArrayRecord

    state.array_records["bench.head"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in head.items()})


def initial_table(work: Workload) -> np.ndarray:
    """fedembed's seeded version-0 table (the same start for every method)."""
    from fedembed.tables import init_table

    return init_table("ids", (work.rows, work.dim), work.seed, 0.1)


# --------------------------------------------------------------------------- dense FedAvg


def run_flower_fedavg(work: Workload, num_cpus: int) -> Meter:
    """Flower dense FedAvg (Message API strategy) over ``work``; returns the meter."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    meter = Meter()
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        mgrid = _make_metered_grid(grid, meter, lambda m: m.metadata.message_type)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=work.orgs,
                          min_available_nodes=work.orgs)
        arrays = ArrayRecord({"ids": Array(initial_table(work))})
        strategy.start(grid=mgrid, initial_arrays=arrays, num_rounds=work.rounds, timeout=3600.0)
        meter.t_end, meter.cpu_end = time.perf_counter(), tree_cpu_seconds()

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        org = int(context.node_config["partition-id"])
        table = msg.content["arrays"]["ids"].numpy()
        rnd = int(msg.content["config"]["server-round"]) if "server-round" in msg.content["config"] else 0
        new, examples, head = dense_local_update(work, org, table, rnd, _head_from_state(context.state))
        _head_to_state(context.state, head)
        content = RecordDict({"arrays": ArrayRecord({"ids": Array(new)}),
                              "metrics": MetricRecord({"num-examples": examples})})
        return Message(content=content, reply_to=msg)

    _run(server, client, work.orgs, num_cpus)
    return meter


# --------------------------------------------------------------------------- SecAgg+


def run_flower_secaggplus(work: Workload, num_cpus: int) -> Meter:
    """Flower legacy SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) over ``work``."""
    from flwr.app import Context
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    meter = Meter()
    server = ServerApp()

    def stage_of(msg: Any) -> str:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and "stage" in cfg:
            return SECAGG_STAGE_NAMES.get(str(cfg["stage"]), str(cfg["stage"]))
        return msg.metadata.message_type

    # The FedAvg weight is the example count; SecAgg+ needs it below max_weight.
    from fedembed.task import load_task

    max_examples = max(load_task(work.org_task(o)).num_examples("train") for o in range(work.orgs))

    @server.main()
    def main(grid: Any, context: Context) -> None:
        mgrid = _make_metered_grid(grid, meter, stage_of)
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=work.orgs,
                          min_evaluate_clients=0, min_available_clients=work.orgs,
                          initial_parameters=ndarrays_to_parameters([initial_table(work)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=work.rounds), strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
            num_shares=work.shares, reconstruction_threshold=work.threshold, max_weight=float(max_examples)))
        workflow(mgrid, legacy)
        meter.t_end, meter.cpu_end = time.perf_counter(), tree_cpu_seconds()

    class Org(NumPyClient):
        def __init__(self, context: Context) -> None:
            self.context = context
            self.org = int(context.node_config["partition-id"])

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            rnd = int(self.context.state.config_records["bench"]["round"]) + 1 if "bench" in self.context.state.config_records else 1
            from flwr.app import ConfigRecord

            self.context.state.config_records["bench"] = ConfigRecord({"round": rnd})
            new, examples, head = dense_local_update(work, self.org, parameters[0], rnd, _head_from_state(self.context.state))
            _head_to_state(self.context.state, head)
            return [new], int(examples), {}

    def client_fn(context: Context) -> Any:
        return Org(context).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    _run(server, client, work.orgs, num_cpus)
    return meter


def _run(server: Any, client: Any, orgs: int, num_cpus: int) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "logging_level": "error", "log_to_driver": True},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flwr_logger.setLevel(logging.ERROR)
        run_simulation(server_app=server, client_app=client, num_supernodes=orgs, backend_config=backend)
    flwr_logger.setLevel(level)


def workload_from_json(text: str) -> Workload:
    """Inverse of ``json.dumps(asdict(work))``."""
    return Workload(**json.loads(text))
