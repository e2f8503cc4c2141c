"""The SuperNode hands each message it pulls to the organisation worker and stores the reply itself.

Flower 1.42's SuperNode keeps each message it pulls from the SuperLink as a *task* in its
own state (``NodeState``, ``ObjectStore``) and waits for an executor to claim it over its
Runtime API (HTTP on loopback): by default a fresh ``flwr-clientapp`` process per message.
A message then cost about 19 local HTTP requests on top of its work (claim, activate,
pull the message and each of its objects, confirm, push the reply and each of its
objects, finish, heartbeats). ``fedembed client``'s SuperNode
(``python -m fedembed.deploy.supernode --worker-socket PATH``) instead runs
:func:`answer_stored_messages` in its own message loop, right after Flower's
``_pull_and_store_message`` has stored a message and created its task
(:func:`hand_messages_to_worker`):

1. the task is claimed and started in the SuperNode's own state, as the Runtime API does
   for an executor (``claim_task``, ``activate_task``: Flower's task states, its
   heartbeat bookkeeping kept alive while the worker works);
2. the message is read from the SuperNode's own store and handed to the organisation
   worker over its owner-only Unix socket (:func:`fedembed.worker.forward`: one local
   socket exchange);
   (a packed message, :mod:`fedembed.apps.packing`, is unpacked first and the reply
   packed the same way);
3. the worker's signed reply is stored as Flower stores the replies it generates itself
   (``_insert_message``) and the task finished (``completed``), so Flower's
   ``_push_messages`` finds the reply at once and pushes it to the SuperLink.

Nothing else changes: the reply is the worker's, signed by the organisation and bound to
run, round, stage and node (:func:`fedembed.org.handle_content`); the worker builds the
organisation from its own node config; the run's app package is never installed or
loaded. No Runtime API is served (:func:`runtime_api_off`): no other local process can
claim the organisation's messages. Every message gets a reply: a worker that refuses
or fails answers with a Flower error reply carrying its reason (task ``failed``); a
worker that is not listening (``fedembed client`` is restarting it) is waited for up to
``wait`` seconds, then the message is answered with an error reply naming the fault.
Nothing a message holds stops the SuperNode's loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.app import Error, Message, RecordDict

from fedembed.apps.packing import PackingError, is_packed, pack, unpack
from fedembed.worker import WorkerError, WorkerUnavailable, forward

log = logging.getLogger(__name__)

WORKER_WAIT = 120.0
"""Seconds a message waits for a worker that is not listening (being restarted) before it is answered with an error."""

Forward = Callable[[str, int, RecordDict], RecordDict]
"""``forward(message_type, node_id, content) -> reply content``; raises like :func:`fedembed.worker.forward`."""


def socket_forward(path: str | Path) -> Forward:
    """Hand a message to the worker listening at ``path`` (:func:`fedembed.worker.forward`)."""

    def send(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
        return forward(path, message_type, node_id, content)

    return send


def answer_stored_messages(state: Any, store: Any, run_id: int, send: Forward, wait: float = WORKER_WAIT,
                           retry: float = 0.25) -> int:
    """Answer every pending ClientApp task of ``run_id`` in the SuperNode's state through ``send``.

    Every message taken from the state is answered (Flower's message loop waits for a
    reply to each): with the worker's reply, or an error reply carrying the reason.

    Parameters
    ----------
    state : flwr.supernode.nodestate.NodeState
        The SuperNode's state, holding the task(s) and message(s) its message loop stored.
    store : flwr.supercore.object_store.ObjectStore
        The SuperNode's object store, holding the messages' objects.
    run_id : int
        The run whose message was just stored.
    send : callable
        Hands one message to the organisation worker (:func:`socket_forward`).
    wait : float
        Seconds to wait for a worker that is not listening before an error reply.
    retry : float
        Seconds between two connection attempts while waiting.

    Returns
    -------
    int
        How many messages were answered (with the worker's reply or an error reply).
    """
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import TaskType

    answered = 0
    for task in state.get_tasks(run_ids=[run_id], statuses=[Status.PENDING], order_by="pending_at"):
        if task.type != TaskType.CLIENT_APP:
            continue  # not ours to run
        started = state.claim_task(task.task_id) is not None and state.activate_task(task.task_id)
        messages = state.get_messages_legacy(run_ids=[run_id], is_reply=False, limit=1)
        if not messages:
            log.error("task %d of run %d came without a message", task.task_id, run_id)
            _finish(state, task.task_id, SubStatus.FAILED, "no message was stored with the task")
            continue
        with _task_heartbeat(state, task.task_id):
            reply, details = _answer(messages[0], state, store, send, wait, retry, started)
        _store_reply(state, store, messages[0], reply)
        if started:
            _finish(state, task.task_id, SubStatus.FAILED if details else SubStatus.COMPLETED, details)
        log.info("%s answered (%s)", messages[0].metadata.message_type, details or "completed")
        answered += 1
    return answered


def _answer(stored: Message, state: Any, store: Any, send: Forward, wait: float, retry: float,
            started: bool) -> tuple[Message, str]:
    """The reply to ``stored`` (the message as the state holds it, without its content) and ``""``, or an error reply and its reason."""
    from flwr.common.constant import ErrorCode

    message_id = stored.metadata.message_id
    state.record_message_processing_start(message_id=message_id)
    try:
        if not started:
            return _error_reply(stored, ErrorCode.UNKNOWN, "the SuperNode could not start the message's task")
        try:
            content = _read_content(store, message_id)
        except Exception as exc:  # noqa: BLE001 - a message the store cannot give back whole
            return _error_reply(stored, ErrorCode.MESSAGE_UNAVAILABLE,
                                f"the SuperNode could not read message {message_id}: {type(exc).__name__}: {exc}")
        packed = is_packed(content)
        try:
            content = unpack(content)
        except PackingError as exc:
            return _error_reply(stored, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                f"malformed message from the coordinator: {exc}")
        reply, details = _ask_worker(stored, content, send, state.get_node_id(), wait, retry)
        if packed and not reply.has_error():  # packed as the message came, after the worker signed it
            reply.content = pack(reply.content)
        return reply, details
    except Exception as exc:  # noqa: BLE001 - nothing a message holds stops the SuperNode's loop
        log.error("%s: %s: %s", stored.metadata.message_type, type(exc).__name__, exc)
        return _error_reply(stored, ErrorCode.UNKNOWN, f"the SuperNode failed on the message: {type(exc).__name__}: {exc}")
    finally:
        state.record_message_processing_end(message_id=message_id)


def _read_content(store: Any, message_id: str) -> RecordDict:
    """The content of message ``message_id``, from the SuperNode's object store (its objects then dropped there).

    As a ClientApp reads it over the Runtime API: the message's object tree, each object,
    inflated; the objects are deleted afterwards, as ``ConfirmMessageReceived`` does.
    """
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    tree = store.get_object_tree(message_id)
    contents: dict[str, bytes] = {}
    for node in iterate_object_tree(tree):
        content = store.get(node.object_id)
        if not content:  # None (unknown) or b"" (preregistered, never stored)
            raise LookupError(f"object {node.object_id} of the message is missing")
        contents[node.object_id] = content
    message = inflate_object_from_contents(message_id, contents)
    if not isinstance(message, Message):
        raise TypeError(f"object {message_id} is a {type(message).__name__}, not a message")
    store.delete(message_id)
    return message.content


def _ask_worker(stored: Message, content: RecordDict, send: Forward, node_id: int, wait: float,
                retry: float) -> tuple[Message, str]:
    """The worker's reply to the message and ``""``, or an error reply and its reason."""
    from flwr.common.constant import ErrorCode

    message_type = stored.metadata.message_type
    deadline = time.monotonic() + wait
    while True:
        try:
            return Message(send(message_type, node_id, content), reply_to=stored), ""
        except WorkerUnavailable as exc:  # nothing was sent: the worker is (re)starting
            if time.monotonic() >= deadline:
                return _error_reply(stored, ErrorCode.CLIENT_APP_CRASHED,
                                    f"the organisation worker did not answer within {wait:.0f} s: {exc}")
            log.warning("%s; %s waits for it", exc, message_type)
            time.sleep(retry)
        except WorkerError as exc:  # it refused or failed (its reason), or broke off mid-message
            log.warning("%s failed: %s", message_type, exc.reason)
            return _error_reply(stored, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, exc.reason)


def _store_reply(state: Any, store: Any, stored: Message, reply: Message) -> None:
    """Store ``reply`` for the message loop to push, as Flower stores the replies it generates itself."""
    from flwr.supernode.start_client_internal import _insert_message

    try:
        _insert_message(reply, state, store)
    except Exception as exc:  # noqa: BLE001 - e.g. a reply Flower cannot store: the loop still needs one
        log.error("could not store the reply to %s: %s: %s", stored.metadata.message_type, type(exc).__name__, exc)
        from flwr.common.constant import ErrorCode

        _insert_message(_error_reply(stored, ErrorCode.UNKNOWN,
                                     f"the SuperNode could not store the reply: {type(exc).__name__}: {exc}")[0],
                        state, store)


def _error_reply(message: Message, code: int, reason: str) -> tuple[Message, str]:
    return Message(Error(code=code, reason=reason), reply_to=message), reason


def _finish(state: Any, task_id: int, sub_status: str, details: str) -> None:
    if not state.finish_task(task_id, sub_status=sub_status, details=details):
        log.warning("task %d could not be finished as %s", task_id, sub_status)


@contextmanager
def _task_heartbeat(state: Any, task_id: int) -> Iterator[None]:
    """Keep the task's claim alive while the worker works (Flower expires a claim without heartbeats)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL

    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_DEFAULT_INTERVAL / 3):
            state.acknowledge_task_heartbeat(task_id)

    thread = threading.Thread(target=beat, name=f"task-{task_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def hand_messages_to_worker(start_client_internal: ModuleType, send: Forward, wait: float = WORKER_WAIT) -> None:
    """Make the SuperNode's message loop answer each message it stores through ``send``.

    Parameters
    ----------
    start_client_internal : ModuleType
        ``flwr.supernode.start_client_internal``: its ``_pull_and_store_message`` returns
        the run id once a message and its objects are stored and its task created; the
        loop's ``_push_messages`` then pushes the reply it finds in the state.
    send : callable
        Hands one message to the organisation worker (:func:`socket_forward`).
    wait : float
        Seconds a message waits for a worker that is not listening.
    """
    pull_and_store = start_client_internal._pull_and_store_message  # pylint: disable=protected-access
    if getattr(pull_and_store, "_fedembed_handoff", False):
        return

    def pull_store_and_answer(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            answer_stored_messages(kwargs["state"], kwargs["object_store"], run_id, send, wait)
        return run_id

    pull_store_and_answer._fedembed_handoff = True  # type: ignore[attr-defined]
    start_client_internal._pull_and_store_message = pull_store_and_answer  # pylint: disable=protected-access


def runtime_api_off(flower_supernode_module: ModuleType) -> None:
    """Start no Runtime API in the SuperNode (``flwr.supernode.cli.flower_supernode``): nothing claims its tasks but us.

    The SuperNode serves its Runtime API (HTTP, loopback) for the ClientApp executors; with
    the messages handed to the worker in-process, nobody needs it, and without it no other
    local process can claim or read the organisation's messages.
    """
    import types

    def no_runtime_api(config: Any, state_factory: Any) -> tuple[Any, threading.Thread]:
        log.info("no Runtime API: the SuperNode hands every message to the organisation worker itself")
        server = types.SimpleNamespace(should_exit=False, force_exit=False, started=True)
        thread = threading.Thread(target=lambda: None, name="no-runtime-api")
        thread.start()
        thread.join()
        return server, thread  # type: ignore[return-value]

    flower_supernode_module._start_supernode_http_api = no_runtime_api  # pylint: disable=protected-access
