"""``python -m fedembed.deploy.supernode ARGS``: Flower's ``flower-supernode`` with a shorter idle poll.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever it polls the SuperLink and finds no
message, and 0.5 s at a time while it waits for the ClientApp's reply in its own local
state. A round of secure aggregation is several message round trips in a row, so each
one waits for those sleeps (1.5 s + 0.25 s on average, per stage). This entry point runs
the stock SuperNode with the sleeps of its message loop capped, nothing else changed:
the idle poll of the SuperLink (a request over the network) at ``FEDEMBED_POLL_SECONDS``
(default 0.2 s), the waits on its own local state (no network) at
``FEDEMBED_LOCAL_POLL_SECONDS`` (default 0.05 s). ``fedembed client`` uses it. The stock
``flower-supernode`` with the same arguments works too, only slower between stages.
"""

from __future__ import annotations

import os
import sys
import time as _time
from types import ModuleType


class _CappedTime(ModuleType):
    """The ``time`` module with ``sleep`` capped (for one Flower module only).

    Parameters
    ----------
    cap : float
        Cap of the long sleeps (1 s or more: the idle poll of the SuperLink).
    local_cap : float
        Cap of the short ones (waits on the SuperNode's own state).
    """

    def __init__(self, cap: float, local_cap: float | None = None) -> None:
        super().__init__("time")
        self._cap = cap
        self._local_cap = cap if local_cap is None else local_cap

    def sleep(self, seconds: float) -> None:  # noqa: D102
        _time.sleep(min(seconds, self._cap if seconds >= 1.0 else self._local_cap))

    def __getattr__(self, name: str):  # everything else is the real module's
        return getattr(_time, name)


def main() -> None:
    """Patch the SuperNode's message loop, then hand over to Flower's own entry point."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap = float(os.environ.get("FEDEMBED_POLL_SECONDS", "0.2"))
    local_cap = float(os.environ.get("FEDEMBED_LOCAL_POLL_SECONDS", "0.05"))
    start_client_internal.time = _CappedTime(cap, local_cap)  # type: ignore[attr-defined]
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
