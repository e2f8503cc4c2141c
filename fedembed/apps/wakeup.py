"""Wake-ups between the coordinator's ServerApp and its Fleet gate: owner-only datagrams that carry nothing.

A deployed round trip used to be found by polling on both sides of the SuperLink: each
organisation's SuperNode asked the SuperLink (through the Fleet gate, over TLS) for a
message every 20-200 ms, and the ServerApp asked it for replies every 50 ms. Instead,
``fedembed server`` gives the gate and the ServerApp a directory (``<state-dir>/wakeup``,
mode 0700) with one Unix datagram socket each (mode 0600):

- ``gate``: the ServerApp sends a datagram there once it has pushed a stage's messages;
  the gate, which holds each SuperNode's empty ``pull-messages`` open for a while (a long
  poll, :mod:`fedembed.deploy.fleetgate`), asks the SuperLink again for every held poll;
- ``serverapp``: the gate sends a datagram there once a reply has been pushed whole;
  the ServerApp, waiting for replies, asks the SuperLink for them.

A datagram carries nothing and is believed in nothing: it only makes its receiver ask
the SuperLink once more, which it also does on its own at a slower pace (a datagram may
be lost, or never sent by a stock component). Only the coordinator's own user can send
one (file modes), and one forged or repeated costs one extra question to the SuperLink.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from pathlib import Path

from fedembed.store import bind_private_socket

log = logging.getLogger(__name__)

GATE = "gate"
"""File name of the gate's socket in the wake-up directory."""

SERVERAPP = "serverapp"
"""File name of the ServerApp's socket in the wake-up directory."""

RUN_CONFIG_KEY = "wakeup-dir"
"""Run config key under which ``fedembed server`` names the wake-up directory to its ServerApp."""

MAX_SOCKET_PATH = 100
"""A Unix socket path must fit ``sun_path`` (108 bytes on Linux, with some margin)."""


def wakeup_dir(state_dir: Path) -> Path | None:
    """The wake-up directory of a coordinator with state ``state_dir``, created 0700; None if its paths are too long."""
    path = Path(state_dir) / "wakeup"
    if len(os.fsencode(str(path / SERVERAPP))) > MAX_SOCKET_PATH:
        log.warning("no wake-ups between the ServerApp and the Fleet gate: %s is too long for a Unix socket "
                    "(use a shorter --state-dir); both poll the SuperLink instead", path)
        return None
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Wakeups:
    """One end of the wake-ups: a socket to wait on, and the other end's to wake.

    Parameters
    ----------
    listen : Path
        Where to bind this end's socket (mode 0600; a stale file there is replaced).
    other : Path
        The other end's socket (which may not exist yet: nothing is sent then).
    """

    def __init__(self, listen: Path, other: Path) -> None:
        self.path, self.other = Path(listen), Path(other)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self.sock = bind_private_socket(self.path, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)

    @classmethod
    def serverapp(cls, directory: str | Path) -> Wakeups:
        """The ServerApp's end in ``directory``."""
        return cls(Path(directory) / SERVERAPP, Path(directory) / GATE)

    @classmethod
    def gate(cls, directory: str | Path) -> Wakeups:
        """The Fleet gate's end in ``directory``."""
        return cls(Path(directory) / GATE, Path(directory) / SERVERAPP)

    def wake_other(self) -> bool:
        """Send the other end a datagram; whether it was delivered (no one listening is not an error)."""
        try:
            self._sender.sendto(b"!", str(self.other))
            return True
        except OSError:  # not there (yet), not ours, or its queue is full (it has wake-ups to read already)
            return False

    def drain(self) -> int:
        """Read every datagram waiting; how many there were."""
        n = 0
        while True:
            try:
                self.sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return n
            except OSError:
                return n
            n += 1

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a datagram; whether one came (all waiting ones are read)."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(ready) and self.drain() > 0

    def close(self) -> None:
        """Close both sockets and remove this end's file."""
        self.sock.close()
        self._sender.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
