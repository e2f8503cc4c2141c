"""The organisation worker runs its SuperNode's ClientApp tasks itself, one after another.

Flower 1.42's SuperNode keeps the messages it pulls as *tasks* in its own state and serves
them on its Runtime API (HTTP, ``127.0.0.1:<port>``). With ``--isolation subprocess`` (the
default) it starts a SuperExec that polls ``AcquireTask`` and starts a fresh
``flwr-clientapp`` process per task (Python, Flower and the app imported every time: a
second or more per message, several under load). With ``--isolation process`` it starts
nothing and waits for an executor of its own to come. :class:`TaskLoop` is that executor,
in the organisation worker (:mod:`fedembed.worker`), which holds torch and the task: it
speaks the Runtime API the way ``flwr-clientapp`` does
(``flwr.supernode.runtime.run_clientapp``), for one task after another:

1. ``AcquireTask`` (ClientApp tasks only), signed with the SuperExec secret the SuperNode
   was started with (``--superexec-auth-secret-file``): no other local process can claim
   this organisation's messages;
2. with the task's token: ``PullTaskInput`` (activates the task; its context, whose
   ``node_id`` the reply is bound to), ``PullMessages``, the message's objects, confirm;
3. the message through the organisation's handler, the same call a forwarded message gets
   (:func:`fedembed.worker.organisation_handler`: the organisation from the worker's own
   node config, the reply signed by :func:`fedembed.org.handle_content`);
4. the reply pushed (``PushMessages``, its objects), then ``PushTaskOutput`` finishes the task.

When the worker has to look for a task: ``fedembed client``'s SuperNode
(:mod:`fedembed.deploy.supernode`) sends a datagram to the worker's wake-up socket
(``<state-dir>/worker/wakeup``, 0600 in 0700) each time it has stored a message
(:func:`wake_worker_on_messages`), and the loop claims the task at once; without a
wake-up (a SuperNode that sends none, a datagram lost) it polls, every few milliseconds
right after a task, backing off to :data:`IDLE_POLL` with a wake-up socket and to
:data:`IDLE_POLL_UNWOKEN` without. A datagram carries nothing: a forged one only makes
the loop ask the SuperNode once more.

The SuperNode's state machine is Flower's own: the task is claimed, activated, kept alive
with heartbeats while it runs (a task whose heartbeats stop is expired by the SuperNode,
which answers the coordinator with Flower's "ClientApp stopped responding" error) and
finished. The run's FAB is neither installed nor loaded: the worker answers with
fedembed's own ClientApp code, never with code a message names. A handler that fails
(the organisation refuses, bad input) is answered with a Flower error reply, as a
failing ClientApp process is; nothing a message holds stops the loop. Unlike
``flwr-clientapp``, nothing here signals or exits the process (Flower's HTTP retry helper
sends the process SIGINT on an HTTP 401; its heartbeat helper on a refused heartbeat).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
from flwr.app import Error, Message, RecordDict

from fedembed.errors import FedembedError
from fedembed.store import bind_private_socket

log = logging.getLogger(__name__)

Handler = Callable[[str, int, RecordDict], RecordDict]
"""``handler(message_type, node_id, content) -> reply content`` (see :class:`fedembed.worker.Worker`)."""

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
"""The Runtime API call the SuperExec secret signs."""

WAKEUP_ENV = "FEDEMBED_TASK_WAKEUP"
"""Environment variable naming the worker's wake-up socket to :mod:`fedembed.deploy.supernode`."""

IDLE_POLL = 0.5
"""Longest wait between two looks for a task when the SuperNode wakes the worker."""

IDLE_POLL_UNWOKEN = 0.05
"""Longest wait between two looks for a task when nothing wakes the worker."""


class TaskLoopError(FedembedError, RuntimeError):
    """A task could not be run (the SuperNode's Runtime API failed or gave no message)."""


def load_secret(path: str | Path | None) -> bytes | None:
    """The SuperExec secret in ``path`` (raw bytes, as Flower reads it), or None without a path.

    Raises
    ------
    TaskLoopError
        The file cannot be read or is empty.
    """
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise TaskLoopError(f"cannot read the SuperExec secret {path}: {exc}") from exc
    if not secret:
        raise TaskLoopError(f"the SuperExec secret {path} is empty")
    return secret


class TaskLoop:
    """Acquire the SuperNode's ClientApp tasks and answer each with ``handler``, until stopped.

    Parameters
    ----------
    address : str
        The SuperNode's Runtime API, ``host:port`` (plain HTTP on loopback, as the
        SuperNode serves it by default).
    handler : callable
        ``handler(message_type, node_id, content) -> reply content``; its exceptions
        become Flower error replies.
    secret : bytes or None
        The SuperExec secret the SuperNode checks ``AcquireTask`` against (None: the
        SuperNode checks none).
    wakeup : Path or None
        Where to listen for the SuperNode's wake-ups (a Unix datagram socket, created
        0600; the directory must exist), or None to only poll.
    fast, idle : float
        Seconds between two ``AcquireTask`` polls right after a task, and at most while
        none comes (doubling in between; default :data:`IDLE_POLL` with ``wakeup``,
        :data:`IDLE_POLL_UNWOKEN` without).
    message_wait : float
        Seconds to wait for an acquired task's message (the SuperNode creates the task
        just before it stores the message).
    """

    def __init__(self, address: str, handler: Handler, secret: bytes | None = None, wakeup: Path | None = None,
                 fast: float = 0.005, idle: float | None = None, message_wait: float = 30.0) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address, self.handler = address, handler
        self.wakeup_path = None if wakeup is None else Path(wakeup)
        self._wakeup = None if wakeup is None else _bind_wakeup(Path(wakeup))
        self.fast, self.message_wait = fast, message_wait
        self.idle = idle if idle is not None else IDLE_POLL if wakeup is not None else IDLE_POLL_UNWOKEN
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if secret is not None:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}))
        self._acquirer = RuntimeHttpClient.from_server_address(address, insecure=True, root_certificates=None,
                                                               interceptors=interceptors)
        self.stopped = threading.Event()
        self.served = 0

    # -------------------------------------------------------------- the loop
    def acquire(self) -> tuple[str, int] | None:
        """Claim the oldest pending ClientApp task: ``(token, task id)``, or None when there is none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            return res.token, res.task.task_id
        return None

    def run_once(self) -> bool:
        """Run one pending task, if there is one; whether there was.

        Raises
        ------
        httpx.HTTPError
            The SuperNode's Runtime API did not answer ``AcquireTask`` (not up yet,
            restarting, or it refused our secret).
        """
        claimed = self.acquire()
        if claimed is None:
            return False
        token, task_id = claimed
        try:
            self.run_task(token)
        except Exception as exc:  # noqa: BLE001 - one task's trouble never stops the loop
            log.warning("task %d failed: %s: %s", task_id, type(exc).__name__, exc)
        return True

    def serve_forever(self) -> None:
        """Run tasks until :meth:`stop`; a SuperNode that is not (yet) up is waited for."""
        delay, down = self.idle, False
        while not self.stopped.is_set():
            try:
                ran = self.run_once()
            except httpx.HTTPError as exc:
                if not down:
                    down = True
                    log.info("SuperNode Runtime API at %s not answering (%s); waiting for it", self.address, exc)
                self.stopped.wait(0.5)
                continue
            except Exception as exc:  # noqa: BLE001 - nothing the SuperNode answers stops the loop
                log.warning("could not look for a task at %s: %s: %s", self.address, type(exc).__name__, exc)
                self.stopped.wait(0.5)
                continue
            if down:
                log.info("SuperNode Runtime API at %s answering", self.address)
                down = False
            if ran:
                self.served += 1
                delay = self.fast
                continue  # the SuperNode may hold the next task already
            if self._sleep(delay):
                delay = self.fast  # a message was stored: look now, and soon again
            else:
                delay = min(self.idle, delay * 2)

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until the SuperNode wakes us (then True, its datagrams read)."""
        if self._wakeup is None:
            self.stopped.wait(seconds)
            return False
        ready, _, _ = select.select([self._wakeup], [], [], seconds)
        if not ready:
            return False
        while True:  # several wake-ups are one
            try:
                self._wakeup.recv(16)
            except BlockingIOError:
                return True

    def stop(self) -> None:
        """Make :meth:`serve_forever` return after the task it is running (or at once, if it waits)."""
        self.stopped.set()
        if self._wakeup is not None:
            try:
                self._wakeup.sendto(b"!", str(self.wakeup_path))
            except OSError:
                pass

    # -------------------------------------------------------------- one task
    def run_task(self, token: str) -> None:
        """Run the task ``token`` was issued for, as ``flwr-clientapp`` would, and finish it.

        Raises
        ------
        TaskLoopError
            No message came with the task.
        httpx.HTTPError
            The Runtime API failed mid-task (the task is still finished as failed, if the
            SuperNode answers).
        """
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.common.serde import context_from_proto, context_to_proto
        from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest  # pylint: disable=E0611
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message

        client = RuntimeHttpClient.from_server_address(
            self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
        )
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        context, sub_status, details = None, SubStatus.FAILED, "the organisation worker failed before replying"
        try:
            heartbeat.start()
            res = client.PullTaskInput(PullTaskInputRequest())
            context = context_from_proto(res.context)
            message = self._pull_message(client, context.run_id, context.node_id)
            started = time.perf_counter()
            try:
                content = self.handler(message.metadata.message_type, context.node_id, message.content)
                reply = Message(content, reply_to=message)
                sub_status, details = SubStatus.COMPLETED, ""
            except Exception as exc:  # noqa: BLE001 - the organisation refuses or fails: an error reply
                log.warning("%s failed: %s: %s", message.metadata.message_type, type(exc).__name__, exc)
                details = f"{type(exc).__name__}: {exc}"  # as the worker's socket words it
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
            log.info("%s answered in %.3f s", message.metadata.message_type, time.perf_counter() - started)
            push_message(client, reply, context)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            try:
                client.PushTaskOutput(PushTaskOutputRequest(
                    context=context_to_proto(context) if context is not None else None,
                    sub_status=sub_status, details=details,
                ))
            except httpx.HTTPError as exc:
                log.warning("could not finish the task: %s", exc)
            client.close()

    def _pull_message(self, client, run_id: int, node_id: int) -> Message:
        """The task's message with its content (as ``flwr-clientapp``'s ``pull_task_input`` pulls it).

        The SuperNode creates the task just before it stores the message, and stores the
        message's objects after it: both are waited for (objects asked for again after
        20 ms, not Flower's 1 s).
        """
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        from fedembed.apps.latency import PULL_BACKOFF_CAP, PULL_INITIAL_BACKOFF

        deadline, wait = time.monotonic() + self.message_wait, 0.005
        while not (res := client.PullMessages(PullAppMessagesRequest())).messages_list:
            if time.monotonic() > deadline:
                raise TaskLoopError(f"no message came with the task within {self.message_wait:.0f} s")
            time.sleep(wait)
            wait = min(0.2, wait * 2)
        node = Node(node_id=node_id)
        tree = res.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
            return_type=Message, initial_backoff=PULL_INITIAL_BACKOFF, backoff_cap=PULL_BACKOFF_CAP,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # not in the deflated message (Flower does the same)
        return message

    def close(self) -> None:
        """Close the connection to the Runtime API and remove the wake-up socket."""
        self._acquirer.close()
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
            try:
                self.wakeup_path.unlink()
            except FileNotFoundError:
                pass


def _bind_wakeup(path: Path) -> socket.socket:
    """A non-blocking Unix datagram socket bound at ``path``, mode 0600 (a stale file there is replaced)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = bind_private_socket(path, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


def wake_worker_on_messages(start_client_internal: ModuleType, path: str | Path) -> None:
    """Make the SuperNode's message loop wake the worker at ``path`` whenever it has stored a message.

    Parameters
    ----------
    start_client_internal : ModuleType
        ``flwr.supernode.start_client_internal`` (its ``_pull_and_store_message`` returns
        the run id once the message and its objects are stored, and its task created).
    path : str or Path
        The worker's wake-up socket. Nothing listening there is not an error: the worker
        also polls.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    pull_and_store = start_client_internal._pull_and_store_message  # pylint: disable=protected-access

    def pull_store_and_wake(*args, **kwargs):
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            try:
                sock.sendto(b"!", str(path))
            except OSError:
                pass
        return run_id

    start_client_internal._pull_and_store_message = pull_store_and_wake  # pylint: disable=protected-access


def _heartbeat_fn(client) -> Callable[[], bool]:
    """A task heartbeat that reports failure instead of signalling the process (Flower's raises SIGINT)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False  # Flower's sender tries again soon
        if not res.success:  # the task was finished or expired meanwhile: its end is the loop's to handle
            log.debug("task heartbeat refused")
        return True

    return beat
