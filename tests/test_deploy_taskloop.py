"""The organisation worker's task loop against a SuperNode's Runtime API (Flower's own app and state).

Each test serves Flower's SuperNode Runtime API (``flwr.supernode.main.create_app`` over
the SuperNode's own ``NodeState``, on loopback) in this process and stores coordinator
messages in that state as the SuperNode's message loop does when it pulls one (a ClientApp
task, then the message and its objects). The task loop then runs them through a handler,
as the worker does with the organisation's.
"""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode, Status, SubStatus
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.start_client_internal import _insert_message

from fedembed.deploy import free_port
from fedembed.apps.taskloop import TaskLoop, load_secret, TaskLoopError

NODE, RUN = 4242, 77


class RuntimeApi:
    """A SuperNode's Runtime API and state, as ``flower-supernode --isolation process`` serves them."""

    def __init__(self, secret: bytes | None = None, port: int | None = None) -> None:
        factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state, self.objects = factory.state(), factory.objectstore_factory.store()
        self.state.set_node_id(NODE)
        content = b"not a real FAB: the worker never installs it"
        fab = Fab(hash_str=hashlib.sha256(content).hexdigest(), content=content, verifications={})
        run = Run.create_empty(RUN)
        run.fab_hash, run.primary_task_type = fab.hash_str, TaskType.CLIENT_APP
        self.state.store_run(run)
        self.state.store_fab(fab)
        self.state.set_run_series_context(run.series_id, Context(run_id=RUN, node_id=NODE, node_config={},
                                                                 state=RecordDict(), run_config={}))
        self.fab_hash = fab.hash_str
        self.replies: dict[str, Message] = {}
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(state_factory=factory, superexec_auth_secret=secret),
                                                    host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def new_task(self) -> int:
        return self.state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN, fab_hash=self.fab_hash)

    def store(self, content: RecordDict, message_type: str) -> Message:
        meta = Metadata(run_id=RUN, message_id="", src_node_id=1, dst_node_id=NODE, reply_to_message_id="",
                        group_id="3", created_at=time.time(), ttl=600.0, message_type=message_type)
        msg = Message(content, metadata=meta)
        _insert_message(msg, self.state, self.objects)
        return msg

    def deliver(self, content: RecordDict, message_type: str = "train") -> tuple[int, Message]:
        """A coordinator message as the SuperNode keeps it once pulled: its task, then the message."""
        return self.new_task(), self.store(content, message_type)

    def reply(self, msg: Message) -> Message:
        """The reply the SuperNode would push to the SuperLink for ``msg``, with its content."""
        for m in self.state.get_messages_legacy(is_reply=True):  # each reply is handed out once: keep them
            assert m.metadata.reply_to_message_id not in self.replies, "two replies to one message"
            self.replies[m.metadata.reply_to_message_id] = m
        reply_id = self.replies[msg.metadata.message_id].metadata.message_id
        tree = self.objects.get_object_tree(reply_id)
        contents = {t.object_id: self.objects.get(t.object_id) for t in iterate_object_tree(tree)}
        return inflate_object_from_contents(reply_id, contents, keep_object_contents=True)

    def task_status(self, task_id: int) -> tuple[str, str]:
        (task,) = self.state.get_tasks(task_ids=[task_id])
        return task.status.status, task.status.sub_status

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def api():
    a = RuntimeApi()
    yield a
    a.close()


def _content(x: int = 1) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"round": 3, "x": x}),
                       "rows": ArrayRecord({"r": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})})


def echo(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
    if message_type == "train.boom":
        raise ValueError("this organisation refuses the plan")
    out = RecordDict(dict(content.items()))
    out["echo"] = ConfigRecord({"message_type": message_type, "node_id": node_id})
    return out


def test_the_worker_runs_a_supernode_task_in_process_and_its_reply_answers_the_message(api):
    loop = TaskLoop(api.address, echo)
    task, msg = api.deliver(_content(5))
    assert loop.run_once()
    reply = api.reply(msg)
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id and reply.metadata.dst_node_id == 1
    assert dict(reply.content["echo"]) == {"message_type": "train", "node_id": NODE}  # the node id of its context
    assert reply.content["config"]["x"] == 5
    np.testing.assert_array_equal(reply.content["rows"]["r"].numpy(), _content()["rows"]["r"].numpy())
    assert api.task_status(task) == (Status.FINISHED, SubStatus.COMPLETED)
    assert not loop.run_once()  # nothing left
    loop.close()


def test_a_refusing_organisation_is_an_error_reply_and_the_loop_goes_on(api):
    loop = TaskLoop(api.address, echo)
    bad_task, bad = api.deliver(_content(), "train.boom")
    assert loop.run_once()
    err = api.reply(bad)
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "refuses the plan" in err.error.reason
    assert api.task_status(bad_task) == (Status.FINISHED, SubStatus.FAILED)
    task, good = api.deliver(_content(2))
    assert loop.run_once()
    assert api.reply(good).content["config"]["x"] == 2
    assert api.task_status(task) == (Status.FINISHED, SubStatus.COMPLETED)
    loop.close()


def test_only_the_holder_of_the_supernodes_secret_claims_its_tasks(tmp_path):
    secret = b"\x07" * 32
    api = RuntimeApi(secret=secret)
    try:
        task, msg = api.deliver(_content(9))
        for claimant in (TaskLoop(api.address, echo), TaskLoop(api.address, echo, secret=b"\x08" * 32)):
            with pytest.raises(httpx.HTTPStatusError) as info:  # and this process is not signalled, unlike Flower's
                claimant.run_once()
            assert info.value.response.status_code == 401
            claimant.close()
        assert api.task_status(task)[0] == Status.PENDING  # nobody got it
        path = tmp_path / "secret"
        path.write_bytes(secret)
        loop = TaskLoop(api.address, echo, secret=load_secret(path))
        assert loop.run_once() and api.reply(msg).content["config"]["x"] == 9
        loop.close()
    finally:
        api.close()


def test_an_empty_or_missing_secret_file_is_refused(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(TaskLoopError):
            load_secret(path)
    assert load_secret(None) is None


def test_a_task_whose_message_the_supernode_stores_after_creating_it_is_waited_for(api):
    loop = TaskLoop(api.address, echo)
    task = api.new_task()  # the SuperNode creates the task, then pulls and stores the message
    stored: list[Message] = []
    timer = threading.Timer(0.3, lambda: stored.append(api.store(_content(4), "train")))
    timer.start()
    assert loop.run_once()
    timer.join()
    assert api.reply(stored[0]).content["config"]["x"] == 4
    assert api.task_status(task) == (Status.FINISHED, SubStatus.COMPLETED)
    loop.close()


def test_the_loop_waits_for_a_supernode_that_is_not_up_yet_and_serves_until_stopped():
    port = free_port()
    loop = TaskLoop(f"127.0.0.1:{port}", echo)
    thread = threading.Thread(target=loop.serve_forever, daemon=True)
    thread.start()
    time.sleep(0.5)  # nothing listens: the loop waits
    api = RuntimeApi(port=port)
    try:
        msgs = [api.deliver(_content(i))[1] for i in range(3)]
        deadline = time.monotonic() + 30
        while loop.served < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [api.reply(m).content["config"]["x"] for m in msgs] == [0, 1, 2]
    finally:
        loop.stop()
        thread.join(timeout=10)
        api.close()
    assert not thread.is_alive()
    loop.close()


def test_a_message_the_supernode_stores_wakes_the_loop_instead_of_its_next_poll(api, tmp_path):
    import os
    import stat
    import types

    from fedembed.apps.taskloop import wake_worker_on_messages

    wakeup = tmp_path / "wakeup"
    loop = TaskLoop(api.address, echo, wakeup=wakeup, idle=60.0)  # polling alone would take a minute
    assert stat.S_IMODE(os.stat(wakeup).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(wakeup).st_mode)
    stored: list[Message] = []

    def pull_and_store_message(**_kwargs):  # the SuperNode's message loop storing a pulled message
        stored.append(api.deliver(_content(len(stored)))[1])
        return RUN

    supernode = types.SimpleNamespace(_pull_and_store_message=pull_and_store_message)
    wake_worker_on_messages(supernode, wakeup)
    thread = threading.Thread(target=loop.serve_forever, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # the loop has looked once and now waits (60 s, or a wake-up)
        for n in (1, 2):
            assert supernode._pull_and_store_message(state=None) == RUN
            deadline = time.monotonic() + 20
            while loop.served < n and time.monotonic() < deadline:
                time.sleep(0.02)
            assert loop.served == n
        assert [api.reply(m).content["config"]["x"] for m in stored] == [0, 1]
    finally:
        loop.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()  # stopping wakes it too
    loop.close()
    assert not wakeup.exists()


def test_an_answer_the_loop_cannot_read_does_not_stop_it(api, monkeypatch):
    loop = TaskLoop(api.address, echo, idle=0.05)
    calls = []
    real = loop.acquire

    def garbled():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Invalid protobuf response payload")  # what Flower's client raises on garbage
        return real()

    monkeypatch.setattr(loop, "acquire", garbled)
    thread = threading.Thread(target=loop.serve_forever, daemon=True)
    thread.start()
    try:
        msg = api.deliver(_content(3))[1]
        deadline = time.monotonic() + 20
        while loop.served < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.reply(msg).content["config"]["x"] == 3
    finally:
        loop.stop()
        thread.join(timeout=5)
    loop.close()
