"""The organisation worker: one long-lived process per organisation that answers its messages.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, and importing
torch and building the task in it cost seconds per message. ``fedembed client`` therefore
also runs this worker (``python -m fedembed.worker``), which holds the organisation's
heavy state (torch, the loaded task and its data) for as long as the organisation runs.
Messages reach it on its socket (:func:`forward`), one at a time, from:

- ``fedembed client``'s own SuperNode, which hands each message it pulls to the worker
  in its own message loop and stores the reply itself
  (:mod:`fedembed.deploy.handoff`): no process is started per message, no local HTTP;
- a per-message ClientApp (:mod:`fedembed.apps.client`, under a SuperNode that starts
  one per message, e.g. the stock ``flower-supernode``, or ``fedembed client``'s while
  it runs in Flower's default mode) that only forwards the message and returns the reply.

What stays as it is: the organisation, its identity and its policy come from the node
config ``fedembed client`` was started with (never from a message), and are read again
for every message exactly as the in-process ClientApp reads them; every reply is signed
by :func:`fedembed.org.handle_content`; the secure stages keep their file lock and their
session state in the state directory. Only what is expensive and not a setting is kept
between messages: the torch import and the task (:func:`fedembed.task.load_task`'s cache).

Who may connect: the socket is ``<state-dir>/worker/sock``, mode 0600, in a directory of
mode 0700, and a connecting process must run as the worker's own user (``SO_PEERCRED``).
One message is handled at a time (one connection at a time, in order of arrival).

Wire format (both directions): frames of an 8-byte big-endian length and a payload. A
request is a JSON header frame ``{"message_type": ..., "node_id": ...}`` and the content
as a Flower ``RecordDict`` protobuf (:func:`flwr.common.serde.recorddict_to_proto`); a
reply is a JSON header frame ``{"ok": true}`` and the reply content the same way, or
``{"ok": false, "error": ...}`` and an empty frame. Nothing is pickled.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedembed.errors import FedembedError
from fedembed.store import bind_private_socket

log = logging.getLogger(__name__)

SOCKET_NAME = "sock"
"""The socket's file name, in ``<state-dir>/worker/``."""

MAX_FRAME = 1 << 31
"""Largest frame accepted (bytes); a longer one is a bad request."""

MAX_SOCKET_PATH = 100
"""A Unix socket path must fit ``sun_path`` (108 bytes on Linux, with some margin)."""

IO_TIMEOUT = 120.0
"""Seconds a peer may take to send a request or read a reply before it is dropped."""


class WorkerUnavailable(FedembedError, ConnectionError):
    """No worker answered the connection: nothing was sent, the message can be handled in-process."""


class WorkerError(FedembedError, RuntimeError):
    """The worker received the message and failed on it, or the connection broke after sending.

    Parameters
    ----------
    message : str
        What happened, naming the worker and the message type.
    reason : str, optional
        The worker's own words (its refusal or failure: ``"<Error>: <text>"``), as the
        organisation's error reply carries them; default ``message``.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


def socket_path(state_dir: Path) -> Path:
    """Where the worker of the organisation with private state ``state_dir`` listens."""
    return Path(state_dir) / "worker" / SOCKET_NAME


# ------------------------------------------------------------------ framing


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    head = struct.pack(">Q", len(payload))
    if len(payload) < 65536:  # one write for small frames
        sock.sendall(head + payload)
    else:
        sock.sendall(head)
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is over the {MAX_FRAME} byte limit")
    return _recv_exact(sock, n)


def encode_content(content: RecordDict) -> bytes:
    """A RecordDict as bytes (Flower's own protobuf form)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes) -> RecordDict:
    """The RecordDict :func:`encode_content` made ``data`` from."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return recorddict_from_proto(ProtoRecordDict.FromString(data))


# ------------------------------------------------------------------ the ClientApp's side


def forward(path: str | Path, message_type: str, node_id: int, content: RecordDict,
            timeout: float | None = None) -> RecordDict:
    """Send one message to the organisation's worker and return its reply content.

    Parameters
    ----------
    path : str or Path
        The worker's socket (node config ``worker-socket``).
    message_type : str
        The Flower message type (``train``, ``evaluate``, ``train.<secure stage>``).
    node_id : int
        This organisation's Flower node id (bound into the reply's signature).
    content : RecordDict
        The coordinator's message content.
    timeout : float or None
        Seconds to wait for the reply (None: as long as the work takes).

    Returns
    -------
    RecordDict
        The signed reply content.

    Raises
    ------
    WorkerUnavailable
        No worker listens at ``path`` (nothing was sent): handle the message in-process.
    WorkerError
        The worker failed on the message (its reason in the text), or the connection
        broke once the message was sent; the message must not be handled again.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(5.0)
            sock.connect(str(path))
        except OSError as exc:
            raise WorkerUnavailable(f"no organisation worker at {path}: {exc}") from exc
        try:
            sock.settimeout(timeout)
            header = json.dumps({"message_type": message_type, "node_id": int(node_id)}).encode()
            _send_frame(sock, header)
            _send_frame(sock, encode_content(content))
            reply = json.loads(_recv_frame(sock))
            body = _recv_frame(sock)
        except (OSError, EOFError, ValueError) as exc:
            raise WorkerError(f"the organisation worker at {path} did not answer {message_type!r}: {exc}") from exc
    finally:
        sock.close()
    if not reply.get("ok"):
        error = str(reply.get("error"))
        raise WorkerError(f"the organisation worker failed on {message_type!r}: {error}", reason=error)
    return decode_content(body)


# ------------------------------------------------------------------ the worker's side


Handler = Callable[[str, int, RecordDict], RecordDict]

#: The worker's exit code when the organisation's own task cannot be loaded or breaks its contract at start:
#: ``fedembed client`` then stops, rather than restart it and join with a task that cannot train.
EXIT_TASK_BROKEN = 3


def organisation_handler(node_config: Mapping[str, Any]) -> Handler:
    """Handle a message as the organisation ``node_config`` describes (what the ClientApp does in-process).

    The organisation (state dir, identity, policy, its own task and device) is built
    afresh from ``node_config`` for every message, as in the per-message ClientApp;
    torch and the task stay loaded between messages. A bad identity, roster or task
    fails here, at start, not at the first message.
    """
    from fedembed.org import Organisation, OrganisationFailed, handle_content, report_failure
    from fedembed.task import check_task

    config = dict(node_config)
    first = Organisation.from_node_config(config)
    first.table_specs()  # loads the task and builds its model once
    check_task(first.task)  # one loss and one evaluation: a task that breaks its contract fails here, named

    def handle(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
        try:
            return handle_content(Organisation.from_node_config(config), content, message_type, node_id)
        except Exception as exc:  # its error text (its task's, its data's) stays here; the reply says only its kind
            raise OrganisationFailed(report_failure(exc, disclose=False, what=message_type)) from exc

    return handle


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def bind_private(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``: the file 0600, its directory 0700.

    Raises
    ------
    RuntimeError
        Another worker already answers at ``path`` (two ``fedembed client`` on one state dir).
    ValueError
        ``path`` is too long for a Unix socket.
    """
    path = Path(path)
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes: use a shorter --state-dir")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a worker that died
        else:
            raise RuntimeError(f"another organisation worker already answers at {path}: "
                               "is a second `fedembed client` running on this state dir?")
        finally:
            probe.close()
    sock = bind_private_socket(path, socket.SOCK_STREAM)
    sock.listen(16)
    return sock


class Worker:
    """Serves one organisation's messages on a private Unix socket, one at a time.

    Parameters
    ----------
    path : Path
        The socket to listen on (see :func:`bind_private`).
    handler : callable
        ``handler(message_type, node_id, content) -> reply content``; its exceptions become
        error replies, and the worker goes on serving.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self.sock = bind_private(self.path)
        self.served = 0
        self.closed = False

    def serve_one(self) -> None:
        """Accept one connection and answer its requests until the peer closes it."""
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(IO_TIMEOUT)
            if _peer_uid(conn) != os.getuid():
                log.warning("refused a connection from uid %d (only uid %d may use this worker)",
                            _peer_uid(conn), os.getuid())
                self._reply_error(conn, "refused: not this organisation's user")
                return
            while True:
                try:
                    head = _recv_frame(conn)
                except (EOFError, OSError):
                    return  # peer done (or gone)
                except ValueError as exc:
                    self._reply_error(conn, f"bad request: {exc}")
                    return  # the stream is out of step: drop it
                if not self._answer(conn, head):
                    return

    def _answer(self, conn: socket.socket, head: bytes) -> bool:
        """Read the request body after ``head``, handle it, reply; False when the connection is unusable."""
        try:
            body = _recv_frame(conn)
        except (EOFError, OSError, ValueError) as exc:
            log.warning("bad request: %s", exc)
            self._reply_error(conn, f"bad request: {exc}")
            return False
        started = time.perf_counter()
        try:
            req = json.loads(head)
            message_type, node_id = str(req["message_type"]), int(req["node_id"])
            content = decode_content(body)
        except Exception as exc:  # noqa: BLE001 - any malformed request is answered, never fatal
            log.warning("bad request: %s: %s", type(exc).__name__, exc)
            return self._reply_error(conn, f"bad request: {type(exc).__name__}: {exc}")
        try:
            reply = self.handler(message_type, node_id, content)
            data = encode_content(reply)
        except Exception as exc:  # noqa: BLE001 - the organisation refuses or fails: tell the ClientApp
            log.warning("%s failed: %s: %s", message_type, type(exc).__name__, exc)
            return self._reply_error(conn, f"{type(exc).__name__}: {exc}")
        self.served += 1
        log.info("%s answered in %.3f s", message_type, time.perf_counter() - started)
        try:
            _send_frame(conn, json.dumps({"ok": True}).encode())
            _send_frame(conn, data)
        except OSError as exc:
            log.warning("could not send the reply to %s: %s", message_type, exc)
            return False
        return True

    @staticmethod
    def _reply_error(conn: socket.socket, error: str) -> bool:
        try:
            _send_frame(conn, json.dumps({"ok": False, "error": error}).encode())
            _send_frame(conn, b"")
            return True
        except OSError:
            return False

    def serve_forever(self) -> None:
        """Answer connections until the process is stopped."""
        log.info("organisation worker listening on %s", self.path)
        while not self.closed:
            try:
                self.serve_one()
            except OSError as exc:  # one peer's trouble never stops the worker
                if not self.closed:
                    log.warning("connection failed: %s", exc)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self.closed = True
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """``python -m fedembed.worker --socket PATH --node-config CONFIG``: serve until stopped (started by ``fedembed client``)."""
    from flwr.common.config import parse_config_args

    p = argparse.ArgumentParser(prog="python -m fedembed.worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on (0600, directory 0700)")
    p.add_argument("--node-config", required=True, help="the node config of the organisation's SuperNode")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s[worker]: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # `fedembed client` stops us with SIGTERM: remove the socket
    from fedembed.task import TaskError

    try:
        handler = organisation_handler(parse_config_args([args.node_config]))
    except TaskError as exc:  # the organisation's own task is broken: one line, and a code that says so
        log.error("%s", exc)
        return EXIT_TASK_BROKEN
    worker = Worker(args.socket, handler)
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
