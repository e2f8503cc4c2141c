"""Flower ServerApp: a :class:`fedembed.coordinator.Transport` over a Flower ``Grid``.

All round logic lives in :mod:`fedembed.coordinator`; this module only moves messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedembed.config import RunConfig
from fedembed.coordinator import Coordinator, Reply

log = logging.getLogger(__name__)


class GridTransport:
    """Message exchange with organisations through a Flower ``Grid``.

    Parameters
    ----------
    grid : Grid
        The Grid Flower hands to the ServerApp.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

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
        messages = [Message(content=c, dst_node_id=n, message_type=message_type) for n, c in contents.items()]
        replies = []
        for msg in self.grid.send_and_receive(messages, timeout=timeout):
            node = msg.metadata.src_node_id
            if msg.has_error():
                replies.append(Reply(node, None, f"error {msg.error.code}: {_short(msg.error.reason)}"))
            else:
                replies.append(Reply(node, msg.content))
        answered = {r.node for r in replies}
        replies += [Reply(n, None, f"no reply within {timeout:.0f} s") for n in contents if n not in answered]
        return replies


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
) -> ServerApp:
    """A ServerApp running ``cfg`` (or the run config of the Flower context when None).

    Parameters
    ----------
    cfg : RunConfig, optional
        The run; None reads ``context.run_config["fedembed"]`` (a JSON RunConfig) and,
        when the run config has ``state-dir`` (``fedembed server``), keeps checkpoints,
        progress and outputs there (:class:`fedembed.deploy.DeployedRunFiles`).
    state_dir : Path, optional
        Coordinator checkpoints.
    on_round, on_done : callable, optional
        Progress callback per round; called with the coordinator when the run ends.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import json

        run_cfg = cfg or RunConfig.from_dict(json.loads(str(context.run_config["fedembed"])))
        ckpt_dir, round_hook, done_hook = state_dir, on_round, on_done
        if cfg is None and "state-dir" in context.run_config:  # deployed by `fedembed server`
            from fedembed.deploy import DeployedRunFiles

            files = DeployedRunFiles(Path(str(context.run_config["state-dir"])))
            ckpt_dir, round_hook, done_hook = files.coordinator_dir, files.on_round, files.on_done
        coordinator = Coordinator(run_cfg, GridTransport(grid), state_dir=ckpt_dir, on_round=round_hook)
        coordinator.run()
        if done_hook is not None:
            done_hook(coordinator)

    return app


app = make_server_app()
