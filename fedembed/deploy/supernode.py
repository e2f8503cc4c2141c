"""``python -m fedembed.deploy.supernode [--worker-socket PATH] ARGS``: Flower's ``flower-supernode``, set for low latency.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever it polls the SuperLink and finds no
message, 0.5 s at a time while it waits for the ClientApp's reply in its own state, and
1 s (then 2 s, 4 s...) when it pulls a message whose objects the coordinator is still
uploading. A round of secure aggregation is several message round trips in a row, each
one waiting for those sleeps. This entry point runs the stock SuperNode with them
shortened (:mod:`fedembed.apps.latency`): the idle poll of the SuperLink follows
:class:`fedembed.apps.latency.PollingClock` (``FEDEMBED_POLL_MIN_SECONDS``, default
0.02 s, doubling up to ``FEDEMBED_POLL_SECONDS``, default 0.2 s, and none after a poll
the coordinator's Fleet gate held open); the waits on its own state (no network) are
capped at ``FEDEMBED_LOCAL_POLL_SECONDS`` (default 0.02 s); object pulls retry after
0.02 s; idle connections to the gate are kept 60 s instead of httpx's 5 s.

With ``--worker-socket PATH`` (``fedembed client`` gives it while the organisation worker
runs), every message the SuperNode pulls is handed to the worker listening at ``PATH``
inside the SuperNode's own message loop and the reply stored there
(:mod:`fedembed.deploy.handoff`): no ClientApp process, no Runtime API (none is served),
``--isolation process`` implied. Without it, the SuperNode is Flower's, ClientApp
processes and all. The stock ``flower-supernode`` with the same other arguments works
too, only slower.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedembed.apps.latency import PollingClock

WORKER_SOCKET_FLAG = "--worker-socket"
"""This entry point's own option (taken out before Flower parses the rest)."""

EXIT_NOT_ACTIVATED = 4
"""The SuperLink refused to activate this node (Flower's error 2004): its key is not
registered there, or a SuperNode with the same key is online already. ``fedembed
client`` says which to check and tries again ever more slowly."""

_ACTIVATION_FAILED = "[code: 2004]"
"""How Flower 1.42's SuperNode words the SuperLink's refusal to activate it."""


def _take_worker_socket(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--worker-socket PATH`` (or ``=PATH``) out of ``argv``: the path (or None) and the rest."""
    rest, path, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == WORKER_SOCKET_FLAG:
            if i + 1 >= len(argv):
                sys.exit(f"{WORKER_SOCKET_FLAG} needs a path")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith(WORKER_SOCKET_FLAG + "="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def _log_to_stderr() -> None:
    """fedembed's INFO lines in the SuperNode's output, beside Flower's own (which has its own handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedembed")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fast_poll_after_messages(start_client_internal: ModuleType, clock: PollingClock) -> None:
    """Poll fast again after each message the loop stored (Flower's wait for the reply, which did that, is gone)."""
    pull_and_store = start_client_internal._pull_and_store_message  # pylint: disable=protected-access

    def pull_and_store_then_poll_fast(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            clock.message_answered()
        return run_id

    start_client_internal._pull_and_store_message = pull_and_store_then_poll_fast  # pylint: disable=protected-access


def _exit_distinctly_when_not_activated(fleet_http_connection: ModuleType) -> None:
    """Exit with :data:`EXIT_NOT_ACTIVATED` where Flower exits with its generic connection error 305.

    Flower words both "the SuperLink cannot be reached" and "the SuperLink refused this
    node's key" as exit 1; the second needs the coordinator or the organisation to act,
    so ``fedembed client`` must tell them apart.
    """
    flwr_exit = fleet_http_connection.flwr_exit

    def exit_named(code: int, message: str | None = None, *args: Any, **kwargs: Any) -> None:
        if message is not None and _ACTIVATION_FAILED in message:
            sys.exit(EXIT_NOT_ACTIVATED)  # fedembed client says why; Flower's own text names neither cause
        flwr_exit(code, message, *args, **kwargs)

    fleet_http_connection.flwr_exit = exit_named


def main() -> None:
    """Patch the SuperNode's message loop, then hand over to Flower's own entry point."""
    from importlib import import_module

    from flwr.supernode import fleet_http_connection, start_client_internal

    cli = import_module("flwr.supernode.cli.flower_supernode")  # the module (its package exports the function)

    from flwr.supercore.protobuf import client as protobuf_client

    from fedembed.apps.latency import PollingClock, keep_connections, shorten_object_pulls

    worker_socket, argv = _take_worker_socket(sys.argv[1:])
    _log_to_stderr()
    clock = PollingClock(cap=float(os.environ.get("FEDEMBED_POLL_SECONDS", "0.2")),
                         local=float(os.environ.get("FEDEMBED_LOCAL_POLL_SECONDS", "0.02")),
                         fast=float(os.environ.get("FEDEMBED_POLL_MIN_SECONDS", "0.02")))
    start_client_internal.time = clock  # type: ignore[attr-defined]
    shorten_object_pulls(start_client_internal)
    keep_connections(protobuf_client)
    _exit_distinctly_when_not_activated(fleet_http_connection)
    if worker_socket is not None:
        from fedembed.deploy.handoff import hand_messages_to_worker, runtime_api_off, socket_forward

        hand_messages_to_worker(start_client_internal, socket_forward(worker_socket))
        runtime_api_off(cli)
        _fast_poll_after_messages(start_client_internal, clock)
        if "--isolation" in argv and argv[argv.index("--isolation") + 1:][:1] != ["process"]:
            sys.exit(f"{WORKER_SOCKET_FLAG} runs no ClientApp process: drop --isolation or give --isolation process")
        if "--isolation" not in argv:
            argv += ["--isolation", "process"]  # no SuperExec, no ClientApp process
    sys.argv = ["flower-supernode", *argv]
    cli.flower_supernode()


if __name__ == "__main__":
    main()
