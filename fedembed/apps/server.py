"""Flower ServerApp: a :class:`fedembed.coordinator.Transport` over a Flower ``Grid``.

All round logic lives in :mod:`fedembed.coordinator`; this module only moves messages.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedembed.apps.packing import PackingError, pack, shared_records, unpack
from fedembed.apps.wakeup import RUN_CONFIG_KEY, Wakeups
from fedembed.config import RunConfig
from fedembed.coordinator import Coordinator, Reply

log = logging.getLogger(__name__)


class GridTransport:
    """Message exchange with organisations through a Flower ``Grid``.

    A deployed ServerApp packs every message into few Flower objects (each is an HTTP
    request to ship) and unpacks every reply before the coordinator reads it
    (:mod:`fedembed.apps.packing`); a reply that is packed but malformed is an error
    reply of that node, with the reason. Without wake-ups (simulation, or a SuperLink without fedembed's Fleet gate), replies
    are polled for every :attr:`poll_seconds`. Deployed by ``fedembed server``, the
    ServerApp and the Fleet gate wake each other instead (:mod:`fedembed.apps.wakeup`):
    once a stage's messages are pushed, the gate is told to hand them to the SuperNodes'
    held polls at once; the ServerApp pulls replies when the gate says one has been
    pushed whole, and every :attr:`fallback_seconds` regardless (a wake-up may be lost, and
    Flower's own error replies for unreachable organisations come from the SuperLink). A
    deployed Grid's object pulls retry after 20 ms instead of Flower's 1 s
    (:func:`fedembed.apps.latency.shorten_object_pulls`).

    Parameters
    ----------
    grid : Grid
        The Grid Flower hands to the ServerApp.
    poll_seconds : float
        Seconds between two polls for replies, without wake-ups.
    wakeups : Wakeups or None
        The ServerApp's end of the wake-ups (:meth:`fedembed.apps.wakeup.Wakeups.serverapp`).
    fallback_seconds : float
        Longest wait for a wake-up before the replies are pulled anyway.
    pack : bool
        Pack the messages sent (:func:`fedembed.apps.packing.pack`); replies are unpacked
        whenever they come packed.
    """

    def __init__(self, grid: Grid, poll_seconds: float = 0.05, wakeups: Wakeups | None = None,
                 fallback_seconds: float = 1.0, pack: bool = False) -> None:
        from fedembed.apps.latency import shorten_object_pulls

        self.grid = grid
        self.poll_seconds, self.wakeups, self.fallback_seconds = poll_seconds, wakeups, fallback_seconds
        self.pack = pack
        grid_module = sys.modules.get(type(grid).__module__)
        if grid_module is not None and hasattr(grid_module, "pull_objects"):  # the deployed (HTTP) Grid
            shorten_object_pulls(grid_module)

    @classmethod
    def from_run_config(cls, grid: Grid, run_config: Mapping[str, Any]) -> GridTransport:
        """The transport of a deployed ServerApp: with wake-ups if ``fedembed server`` named their directory."""
        directory = run_config.get(RUN_CONFIG_KEY)
        return cls(grid, wakeups=Wakeups.serverapp(str(directory)) if directory else None, pack=True)

    def node_ids(self, minimum: int, timeout: float) -> list[int]:
        """Connected node ids, waiting up to ``timeout`` seconds for ``minimum`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= minimum or time.monotonic() > deadline:
                if len(nodes) < minimum:
                    log.warning("only %d of %d organisations connected after %.0f s", len(nodes), minimum, timeout)
                return nodes
            time.sleep(0.5)

    def exchange(self, message_type: str, contents: dict[int, RecordDict], timeout: float) -> list[Reply]:
        """Send one message per node, return the replies received within ``timeout``."""
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type: str, contents: dict[int, RecordDict], timeout: float) -> Iterator[Reply]:
        """Send one message per node and yield each reply as soon as it arrives.

        The caller can fold a large reply into a running sum and drop it before the next
        one is pulled, so the coordinator never holds every organisation's vector at once.
        Nodes that do not answer within ``timeout`` get a ``Reply`` with an error at the end.
        """
        if self.pack:
            shared = shared_records(contents)  # packed once each, so Flower still pushes them once
            contents = {n: pack(c, shared[n]) for n, c in contents.items()}
        messages = [Message(content=c, dst_node_id=n, message_type=message_type) for n, c in contents.items()]
        ids = list(self.grid.push_messages(messages))
        if self.wakeups is not None:
            self.wakeups.wake_other()  # the gate hands them to the organisations' held polls now
        # Flower's own error replies (node unavailable) come from the SuperLink (src node 1):
        # name the node by the message a reply answers.
        sent = dict(zip(ids, contents))
        pending = set(ids)
        del messages
        answered: set[int] = set()
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            if self.wakeups is not None:  # until the gate says a reply is in (or the fallback's time)
                self.wakeups.wait(min(self.fallback_seconds, deadline - time.monotonic()))
            got = list(self.grid.pull_messages(pending))
            for msg in got:
                if msg.metadata.reply_to_message_id not in sent:  # nothing we asked for (the gate refuses the push)
                    log.warning("dropped a message from node %s that answers no message of this exchange",
                                msg.metadata.src_node_id)
                    continue
                pending.discard(msg.metadata.reply_to_message_id)
                node = sent[msg.metadata.reply_to_message_id]
                answered.add(node)
                if msg.has_error():
                    yield Reply(node, None, f"error {msg.error.code}: {_short(msg.error.reason)}")
                    continue
                try:
                    content = unpack(msg.content)
                except PackingError as exc:
                    log.warning("node %s sent a malformed reply: %s", node, exc)
                    yield Reply(node, None, f"malformed reply: {exc}")
                    continue
                yield Reply(node, content)
            del got
            if pending and self.wakeups is None:
                time.sleep(self.poll_seconds)
        for n in contents:
            if n not in answered:
                yield Reply(n, None, f"no reply within {timeout:.0f} s")


def _short(reason: str, limit: int = 300) -> str:
    """The useful end of a remote traceback (Flower forwards whole Ray tracebacks)."""
    lines = [ln.strip() for ln in str(reason).replace("\\n", "\n").splitlines() if ln.strip()]
    msg = next((ln for ln in reversed(lines) if "Message:" in ln), lines[-1] if lines else "")
    msg = msg.split("Message:", 1)[-1].strip().strip("'>")
    return msg[:limit]


def make_server_app(
    cfg: RunConfig | None = None,
    state_dir: Path | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_done: Callable[[Coordinator], None] | None = None,
    wait_for: int = 0,
    strict: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """A ServerApp running ``cfg`` (or the run config of the Flower context when None).

    Parameters
    ----------
    cfg : RunConfig, optional
        The run; None reads ``context.run_config["fedembed"]`` (a JSON RunConfig) and,
        when the run config has ``state-dir`` (``fedembed server``), keeps checkpoints,
        progress and outputs there (:class:`fedembed.apps.runfiles.DeployedRunFiles`).
    state_dir : Path, optional
        Coordinator checkpoints.
    on_round, on_done : callable, optional
        Progress callback per round; called with the coordinator when the run ends.
    wait_for : int
        Organisations that must be connected before every round (:class:`Coordinator`).
    strict : bool
        An organisation that fails instead of replying fails the run (:class:`Coordinator`).
    on_error : callable, optional
        Called with the error that ended the run, which is then not raised into the
        engine (a simulation re-raises it itself, where its caller sees it).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import json

        run_cfg = cfg or RunConfig.from_dict(json.loads(str(context.run_config["fedembed"])))
        ckpt_dir, round_hook, done_hook = state_dir, on_round, on_done
        if cfg is None and "state-dir" in context.run_config:  # deployed by `fedembed server`
            from fedembed.apps.runfiles import DeployedRunFiles

            files = DeployedRunFiles(Path(str(context.run_config["state-dir"])))
            ckpt_dir, round_hook, done_hook = files.coordinator_dir, files.on_round, files.on_done
        transport = GridTransport.from_run_config(grid, context.run_config) if cfg is None else GridTransport(grid)
        coordinator = Coordinator(run_cfg, transport, state_dir=ckpt_dir, on_round=round_hook, wait_for=wait_for,
                                  strict=strict)
        if cfg is None and "state-dir" in context.run_config:
            files.on_start(coordinator)
        try:
            coordinator.run()
        except Exception as exc:
            if on_error is None:
                raise
            on_error(exc)
            return
        if done_hook is not None:
            done_hook(coordinator)

    return app


app = make_server_app()
