"""The SuperNode hands each message it pulls to the organisation worker (fedembed.deploy.handoff).

Each test runs Flower's own SuperNode message loop functions (``_pull_and_store_message``
and ``_push_messages`` of ``flwr.supernode.start_client_internal``) over the SuperNode's
own ``NodeState`` and ``ObjectStore``, with the SuperLink replaced by functions that hand
out a coordinator message and collect what the SuperNode pushes back; the messages go to a
real organisation worker (:class:`fedembed.worker.Worker`) on its Unix socket.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
import types

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.constant import ErrorCode, Status, SubStatus
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal as flower_loop
from flwr.supernode.nodestate import NodeStateFactory

from conftest import serving_worker
from fedembed.deploy import handoff
from fedembed.deploy.handoff import answer_stored_messages, hand_messages_to_worker, socket_forward
from fedembed.worker import Worker, socket_path

NODE, RUN = 4242, 77


def _content(x: int = 1) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"round": 3, "x": x}),
                       "rows": ArrayRecord({"r": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})})


def echo(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
    if message_type == "train.boom":
        raise ValueError("this organisation refuses the plan")
    out = RecordDict(dict(content.items()))
    out["echo"] = ConfigRecord({"message_type": message_type, "node_id": node_id})
    return out


class SuperNode:
    """A SuperNode's state and its message loop's two steps, against a stand-in SuperLink."""

    def __init__(self, send, wait: float = 0.5) -> None:
        factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state, self.store = factory.state(), factory.objectstore_factory.store()
        self.state.set_node_id(NODE)
        # the run as the SuperNode keeps it once it has seen its first message (the FAB is never used)
        fab = Fab(hash_str=hashlib.sha256(b"no FAB").hexdigest(), content=b"no FAB", verifications={})
        run = Run.create_empty(RUN)
        run.fab_hash, run.primary_task_type = fab.hash_str, TaskType.CLIENT_APP
        self.state.store_run(run)
        self.state.store_fab(fab)
        self.state.set_run_series_context(run.series_id, Context(run_id=RUN, node_id=NODE, node_config={},
                                                                 state=RecordDict(), run_config={}))
        self.loop = types.SimpleNamespace(_pull_and_store_message=flower_loop._pull_and_store_message)
        hand_messages_to_worker(self.loop, send, wait=wait)
        self.inbox: list[tuple[Message, object, dict[str, bytes]]] = []
        self.pushed: list[Message] = []

    def coordinator_sends(self, content: RecordDict, message_type: str = "train") -> Message:
        """The coordinator's message, as the SuperLink hands it out (header, object tree, objects)."""
        meta = Metadata(run_id=RUN, message_id="", src_node_id=1, dst_node_id=NODE, reply_to_message_id="",
                        group_id="3", created_at=time.time(), ttl=600.0, message_type=message_type)
        msg = Message(content, metadata=meta)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        objects = {i: o.deflate() for i, o in get_all_nested_objects(msg).items()}
        self.inbox.append((remove_content_from_message(msg), get_object_tree(msg), objects))
        return msg

    def pull_and_store(self, loop=None) -> int | None:
        """The first step of the SuperNode's message loop (with the hand-off, unless ``loop`` is Flower's own)."""
        pending = self.inbox.pop(0)
        return (loop or self.loop)._pull_and_store_message(
            state=self.state, object_store=self.store, node_config={}, receive=lambda: pending[:2],
            get_run=None, get_fab=None, pull_object=lambda run_id, object_id: pending[2][object_id],
            confirm_message_received=lambda run_id, message_id: None, trusted_entities=None)

    def push(self) -> None:
        """The second step: Flower pushes the reply it finds in the state (and waits until there is one)."""
        flower_loop._push_messages(state=self.state, object_store=self.store, send=self._send,
                                   push_object=self._push_object)

    def step(self) -> int | None:
        """One turn of the SuperNode's message loop: pull and store (the hand-off runs here), push the reply."""
        run_id = self.pull_and_store()
        if run_id is not None:
            self.push()
        return run_id

    def _send(self, message: Message, tree, runtime: float) -> tuple[set[str], str]:
        self._tree, self._objects = tree, {}
        self.pushed.append(message)
        return {t.object_id for t in iterate_object_tree(tree)}, "session"

    def _push_object(self, run_id: int, session: str, object_id: str, content: bytes) -> None:
        self._objects[object_id] = content
        if len(self._objects) == len(list(iterate_object_tree(self._tree))):  # the whole reply has arrived
            reply = inflate_object_from_contents(self._tree.object_id, dict(self._objects))
            header = self.pushed.pop()
            reply.metadata.__dict__["_message_id"] = header.metadata.message_id
            self.pushed.append(reply)

    def reply_to(self, msg: Message) -> Message:
        (reply,) = [m for m in self.pushed if m.metadata.reply_to_message_id == msg.metadata.message_id]
        return reply

    def task_statuses(self) -> list[tuple[str, str]]:
        return [(t.status.status, t.status.sub_status) for t in self.state.get_tasks(order_by="pending_at")]


@pytest.fixture
def worker(tmp_path):
    yield from serving_worker(tmp_path / "org", echo)


def test_the_supernode_hands_a_message_to_the_worker_and_pushes_its_reply_in_the_same_turn(worker):
    node = SuperNode(socket_forward(worker.path))
    msg = node.coordinator_sends(_content(5))
    assert node.step() == RUN
    reply = node.reply_to(msg)  # pushed by Flower's own _push_messages, right after the hand-off
    assert not reply.has_error()
    assert reply.metadata.dst_node_id == 1 and reply.metadata.src_node_id == NODE
    assert dict(reply.content["echo"]) == {"message_type": "train", "node_id": NODE}  # the node id of the SuperNode
    assert reply.content["config"]["x"] == 5
    np.testing.assert_array_equal(reply.content["rows"]["r"].numpy(), _content()["rows"]["r"].numpy())
    assert node.task_statuses() == [(Status.FINISHED, SubStatus.COMPLETED)]
    assert worker.served == 1
    assert node.state.get_messages_legacy() == [] and node.store.get(msg.metadata.message_id) is None  # nothing kept


def test_a_refusing_organisation_is_an_error_reply_with_its_reason_and_the_next_message_is_served(worker):
    node = SuperNode(socket_forward(worker.path))
    bad = node.coordinator_sends(_content(), "train.boom")
    good = node.coordinator_sends(_content(2))
    node.step()
    node.step()
    err = node.reply_to(bad)
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert err.error.reason == "ValueError: this organisation refuses the plan"  # the worker's own words
    assert node.reply_to(good).content["config"]["x"] == 2
    assert node.task_statuses() == [(Status.FINISHED, SubStatus.FAILED), (Status.FINISHED, SubStatus.COMPLETED)]


def test_a_worker_that_does_not_come_back_is_an_error_reply_naming_the_fault(tmp_path):
    node = SuperNode(socket_forward(tmp_path / "nobody" / "sock"))  # waits 0.5 s for it
    msg = node.coordinator_sends(_content())
    assert node.step() == RUN
    err = node.reply_to(msg)
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_CRASHED
    assert "organisation worker did not answer" in err.error.reason and "nobody" in err.error.reason
    assert node.task_statuses() == [(Status.FINISHED, SubStatus.FAILED)]


def test_a_message_waits_for_a_worker_that_is_being_restarted(tmp_path):
    path = socket_path(tmp_path / "org")
    started: list[Worker] = []

    def restart_worker() -> None:  # what `fedembed client` does when its worker died
        started.append(Worker(path, echo))
        threading.Thread(target=started[0].serve_forever, daemon=True).start()

    node = SuperNode(socket_forward(path), wait=60.0)
    timer = threading.Timer(0.5, restart_worker)
    timer.start()
    try:
        msg = node.coordinator_sends(_content(7))
        node.step()
        assert node.reply_to(msg).content["config"]["x"] == 7
    finally:
        timer.join()
        for w in started:
            w.close()


def test_a_worker_that_breaks_off_mid_message_is_an_error_reply_not_a_lost_message(tmp_path):
    path = socket_path(tmp_path / "org")
    path.parent.mkdir(mode=0o700, parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def read_then_hang_up() -> None:  # a worker killed while it works on the message
        conn, _ = listener.accept()
        (n,) = struct.unpack(">Q", conn.recv(8, socket.MSG_WAITALL))
        conn.recv(n, socket.MSG_WAITALL)
        conn.close()

    t = threading.Thread(target=read_then_hang_up, daemon=True)
    t.start()
    node = SuperNode(socket_forward(path))
    msg = node.coordinator_sends(_content())
    node.step()
    t.join(timeout=10)
    listener.close()
    err = node.reply_to(msg)
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "did not answer 'train'" in err.error.reason
    assert node.task_statuses() == [(Status.FINISHED, SubStatus.FAILED)]


def test_a_message_whose_objects_the_supernode_lost_is_answered_with_an_error(worker):
    node = SuperNode(socket_forward(worker.path))
    msg = node.coordinator_sends(_content())
    run_id = node.pull_and_store(loop=flower_loop)  # stored as Flower's loop does, before the hand-off
    leaf = [t.object_id for t in iterate_object_tree(node.store.get_object_tree(msg.metadata.message_id))][-1]
    node.store.store[leaf].content = b""  # as if never stored
    assert answer_stored_messages(node.state, node.store, run_id, socket_forward(worker.path)) == 1
    node.push()
    err = node.reply_to(msg)
    assert err.has_error() and err.error.code == ErrorCode.MESSAGE_UNAVAILABLE and leaf in err.error.reason
    assert worker.served == 0
    assert node.task_statuses() == [(Status.FINISHED, SubStatus.FAILED)]


def test_the_task_claim_is_kept_alive_while_the_worker_works(monkeypatch):
    import flwr.common.constant as flower_constants

    monkeypatch.setattr(flower_constants, "HEARTBEAT_DEFAULT_INTERVAL", 0.03)
    beats = threading.Event()

    def slow_worker(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
        assert beats.wait(30), "no heartbeat while the worker worked"
        return echo(message_type, node_id, content)

    node = SuperNode(slow_worker)
    real = node.state.acknowledge_task_heartbeat

    def acknowledge(task_id: int) -> bool:
        beats.set()
        return real(task_id)

    node.state.acknowledge_task_heartbeat = acknowledge
    msg = node.coordinator_sends(_content(4))
    node.step()
    assert node.reply_to(msg).content["config"]["x"] == 4
    assert node.task_statuses() == [(Status.FINISHED, SubStatus.COMPLETED)]


def test_the_supernode_serves_no_runtime_api_when_it_hands_messages_to_the_worker():
    from importlib import import_module

    cli = import_module("flwr.supernode.cli.flower_supernode")
    module = types.SimpleNamespace(_start_supernode_http_api=cli._start_supernode_http_api)
    handoff.runtime_api_off(module)
    server, thread = module._start_supernode_http_api(None, None)
    assert not thread.is_alive()  # nothing serves; Flower's shutdown handler still finds what it stops
    server.should_exit = True
    thread.join(timeout=1)


def test_the_supernode_entry_point_takes_its_own_option_and_leaves_flowers():
    from fedembed.deploy.supernode import _take_worker_socket

    assert _take_worker_socket(["--superlink", "a:1", "--worker-socket", "/s/sock", "--insecure"]) == (
        "/s/sock", ["--superlink", "a:1", "--insecure"])
    assert _take_worker_socket(["--worker-socket=/s/sock"]) == ("/s/sock", [])
    assert _take_worker_socket(["--superlink", "a:1"]) == (None, ["--superlink", "a:1"])
