"""``python -m fedembed.deploy.supernode ARGS``: Flower's ``flower-supernode`` with its waits shortened.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever it polls the SuperLink and finds no
message, 0.5 s at a time while it waits for the ClientApp's reply in its own state, and
1 s (then 2 s, 4 s...) when it pulls a message whose objects the coordinator is still
uploading. A round of secure aggregation is several message round trips in a row, each
one waiting for those sleeps. This entry point runs the stock SuperNode with them
shortened (:mod:`fedembed.apps.latency`), nothing else changed: the idle poll of the
SuperLink (a request over the network) starts at ``FEDEMBED_POLL_MIN_SECONDS`` (default
0.02 s) after a message and doubles up to ``FEDEMBED_POLL_SECONDS`` (default 0.2 s)
while none comes; the waits on its own state (no network) are capped at
``FEDEMBED_LOCAL_POLL_SECONDS`` (default 0.02 s); object pulls retry after 0.02 s.
With ``FEDEMBED_TASK_WAKEUP`` set (``fedembed client`` sets it when the organisation
worker runs the SuperNode's tasks), every message it stores wakes the worker through that
socket (:func:`fedembed.apps.taskloop.wake_worker_on_messages`) instead of the worker
polling for it. ``fedembed client`` uses it. The stock ``flower-supernode`` with the same
arguments works too, only slower between stages.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Patch the SuperNode's message loop, then hand over to Flower's own entry point."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedembed.apps.latency import PollingClock, shorten_object_pulls

    clock = PollingClock(cap=float(os.environ.get("FEDEMBED_POLL_SECONDS", "0.2")),
                         local=float(os.environ.get("FEDEMBED_LOCAL_POLL_SECONDS", "0.02")),
                         fast=float(os.environ.get("FEDEMBED_POLL_MIN_SECONDS", "0.02")))
    start_client_internal.time = clock  # type: ignore[attr-defined]
    shorten_object_pulls(start_client_internal)
    if wakeup := os.environ.get("FEDEMBED_TASK_WAKEUP"):
        from fedembed.apps.taskloop import wake_worker_on_messages

        wake_worker_on_messages(start_client_internal, wakeup)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
