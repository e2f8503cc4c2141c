"""Flower's fixed waits, set for low latency in the processes fedembed starts.

A round of secure aggregation is several message round trips in a row, and Flower 1.42
waits at fixed, long intervals at several points of each one. Two are patched here (only
in the process that asks, never globally), the others are environment variables
(:func:`fedembed.deploy.processes.flower_env`):

- **Object pulls.** A message travels as its header and then its objects (records,
  arrays), each in a request of its own. The receiving side may see the header before
  the last object has arrived: Flower's ``pull_objects`` then waits 1 s before it asks
  again, 2 s, 4 s... (``PULL_INITIAL_BACKOFF``). A reply that the coordinator polls for
  while the organisation is still uploading it (a few tens of milliseconds) cost a whole
  second. :func:`shorten_object_pulls` starts that backoff at
  :data:`PULL_INITIAL_BACKOFF` instead (doubling, capped at :data:`PULL_BACKOFF_CAP`).
- **The SuperNode's message loop** sleeps a fixed 3 s after each poll of the SuperLink
  that found no message, and 0.5 s at a time while it waits for the reply in its own
  state. :class:`PollingClock` replaces those sleeps: the idle poll starts at
  ``fast`` seconds after a message and doubles up to ``cap`` while nothing comes (the
  next stage of a round comes soon after the last; an idle organisation polls slowly),
  the local waits are cut to ``local`` seconds. A poll that the coordinator's Fleet gate
  held open (it took ``held`` seconds or more, see :mod:`fedembed.deploy.fleetgate`) is
  followed by the next one at once: the gate does the waiting.
"""

from __future__ import annotations

import functools
import time as _time
from types import ModuleType
from typing import Any

PULL_INITIAL_BACKOFF = 0.02
"""Seconds before a not-yet-available object is asked for again (Flower: 1 s)."""

PULL_BACKOFF_CAP = 0.1
"""Longest wait between two asks for the same object (Flower: 10 s): a reply is often pulled while its
sender still uploads it (a few tenths of a second for ~12 objects over TLS), and each ask is one small request."""


def shorten_object_pulls(module: ModuleType) -> None:
    """Make ``module``'s ``pull_objects`` (Flower's, imported there by name) retry sooner.

    Parameters
    ----------
    module : ModuleType
        A Flower module that calls ``pull_objects`` by its module-level name, e.g.
        ``flwr.superlink.grid.http_grid`` (the ServerApp's Grid) or
        ``flwr.supernode.start_client_internal`` (the SuperNode pulling a message).
        Calling this twice on one module changes nothing more.
    """
    current = module.pull_objects
    if getattr(current, "_fedembed_short_backoff", False):
        return

    @functools.wraps(current)
    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", PULL_INITIAL_BACKOFF)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP)
        return current(*args, **kwargs)

    pull_objects._fedembed_short_backoff = True  # type: ignore[attr-defined]
    module.pull_objects = pull_objects


KEEP_ALIVE_SECONDS = 60.0
"""Idle seconds an HTTP connection to the SuperLink (or the coordinator's gate) is kept for reuse (httpx: 5)."""


def keep_connections(module: ModuleType, seconds: float = KEEP_ALIVE_SECONDS) -> None:
    """Make the ``httpx.Client`` that ``module`` creates keep idle connections ``seconds`` (not httpx's 5 s).

    A SuperNode pulls a message's objects over a few connections at once, then works and
    waits; with its poll held open by the coordinator's gate for several seconds, its
    other connections were idle past httpx's 5 s, and every next message began with new
    TLS handshakes. ``module`` is e.g. ``flwr.supercore.protobuf.client`` (Flower's HTTP
    client for the Fleet API); calling this twice changes nothing more.
    """
    import httpx

    if isinstance(module.httpx, _KeepAliveHttpx):
        return
    module.httpx = _KeepAliveHttpx(httpx, seconds)


class _KeepAliveHttpx(ModuleType):
    """``httpx``, whose ``Client`` keeps idle connections longer unless told otherwise."""

    def __init__(self, httpx: ModuleType, seconds: float) -> None:
        super().__init__("httpx")
        base = httpx.Client

        class Client(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                         keepalive_expiry=seconds))
                super().__init__(*args, **kwargs)

        self._httpx, self.Client = httpx, Client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._httpx, name)


class PollingClock(ModuleType):
    """The ``time`` module for the SuperNode's message loop, with its sleeps replaced.

    Parameters
    ----------
    cap : float
        Longest idle poll interval (a request to the SuperLink each time).
    local : float
        Cap of the short waits (the SuperNode looking into its own state for the reply).
    fast : float, optional
        First idle poll interval after a message (default ``min(cap, 0.02)``); it
        doubles with every empty poll, up to ``cap``.
    held : float
        An empty poll that took this long was held open by the coordinator's gate (a long
        poll): the next one follows at once.
    """

    def __init__(self, cap: float, local: float, fast: float | None = None, held: float = 1.0) -> None:
        super().__init__("time")
        self.cap = float(cap)
        self.local = float(local)
        self.fast = min(self.cap, 0.02 if fast is None else float(fast))
        self.held = float(held)
        self.idle = self.cap  # until the first message: poll at the cap
        self._since = _time.monotonic()  # when the loop last went on (end of a sleep, or a message answered)

    def sleep(self, seconds: float) -> None:
        """Flower's 3 s idle sleep becomes the current idle interval (none after a held poll); its waits under 1 s, ``local``."""
        if seconds >= 1.0:  # the SuperLink had nothing for us
            if _time.monotonic() - self._since < self.held:
                _time.sleep(self.idle)
                self.idle = min(self.cap, self.idle * 2)
        else:  # a message is being answered: the next one is likely soon
            _time.sleep(min(seconds, self.local))
            self.idle = self.fast
        self._since = _time.monotonic()

    def message_answered(self) -> None:
        """A message came and was answered: the next idle poll is ``fast`` again (the next stage comes soon)."""
        self.idle = self.fast
        self._since = _time.monotonic()

    def __getattr__(self, name: str) -> Any:  # everything else is the real module's
        return getattr(_time, name)
