"""A deployed message's records packed into few Flower objects, and unpacked strictly (fedembed.apps.packing)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedembed.apps.packing import PACKED, PackingError, PackingMod, is_packed, pack, pack_shared, shared_records, unpack
from fedembed.apps.server import GridTransport
from fedembed.wire import content_digest


def _reply() -> RecordDict:
    """Shaped like an organisation's training reply: small records and its own arrays."""
    return RecordDict({
        "info": ConfigRecord({"org": "org-0", "ok": True, "n": 3, "w": 0.5, "blob": b"\x00\x01", "names": ["a", "b"],
                              "flags": [True, False], "ints": [1, 2], "floats": [0.25]}),
        "metrics": MetricRecord({"loss": 0.25, "examples": 300, "vec": [1.0, 2.0]}),
        "update": ArrayRecord({"t.ids": Array(np.arange(7, dtype=np.int32)),
                               "t.values": Array(np.linspace(0, 1, 56, dtype=np.float16).reshape(7, 8))}),
        "want": ArrayRecord({"t.ids": Array(np.arange(3, dtype=np.int64))}),
        "sig": ConfigRecord({"key": "org-0", "signature": b"\x05" * 64}),
    })


def _objects(content: RecordDict) -> int:
    return len(get_all_nested_objects(content)) + 1  # and the message itself: one request each


def test_unpacking_gives_back_exactly_what_was_signed():
    content = _reply()
    packed = pack(content)
    assert is_packed(packed) and not is_packed(content)
    back = unpack(packed)
    assert sorted(back.keys()) == sorted(content.keys())
    assert content_digest(back) == content_digest(content)  # every value, its type, every array's bytes
    assert dict(back["info"]) == dict(content["info"]) and type(back["metrics"]["examples"]) is int
    np.testing.assert_array_equal(back["update"]["t.values"].numpy(), content["update"]["t.values"].numpy())
    assert unpack(content) is content  # a message that is not packed passes through


def test_a_small_message_is_three_objects_and_large_arrays_stay_an_array():
    content = _reply()
    assert _objects(content) == 13 and _objects(pack(content)) == 3  # message, content, one record
    assert isinstance(pack(content)[PACKED], ConfigRecord)
    big = _reply()
    big["update"]["t.values"] = Array(np.ones((20000, 16), np.float32))  # 1.25 MiB
    packed = pack(big)
    assert _objects(packed) == 5  # message, content, record, array, one 5 MiB chunk
    assert isinstance(packed[PACKED], ArrayRecord)  # large vectors never travel as bytes in a config record
    assert content_digest(unpack(packed)) == content_digest(big)


def test_a_record_several_organisations_receive_is_packed_once_and_stays_one_object():
    sync = ArrayRecord({"t.ids": Array(np.arange(5, dtype=np.int32)), "t.rows": Array(np.ones((5, 4), np.float32))})
    contents = {node: RecordDict({"config": ConfigRecord({"node": node}), "sync": sync}) for node in (1, 2, 3)}
    contents[4] = RecordDict({"config": ConfigRecord({"node": 4}),
                              "sync": ArrayRecord({"t.ids": Array(np.arange(2, dtype=np.int32))})})  # its own
    shared = shared_records(contents)
    packed = {n: pack(c, shared[n]) for n, c in contents.items()}
    assert shared[1]["sync"] is shared[2]["sync"] is shared[3]["sync"] and shared[4] == {}
    ids = {packed[n]["sync"].object_id for n in (1, 2, 3)}
    assert len(ids) == 1 and ids == {pack_shared(sync).object_id}  # content-addressed: pushed once for all three
    assert "sync" not in packed[4]  # not shared: packed with its own records
    for n, c in contents.items():
        assert content_digest(unpack(packed[n])) == content_digest(c)


@pytest.mark.parametrize("mangle, says", [
    (lambda p: p.__setitem__("extra", ConfigRecord({"x": 1})), "'extra'"),
    (lambda p: p.__setitem__(PACKED, ConfigRecord({"records": b"\xff\x00 not records"})), "cannot be read"),
    (lambda p: p.__setitem__(PACKED, ConfigRecord({"records": "text"})), "not bytes"),
    (lambda p: p.__setitem__(PACKED, ConfigRecord({"records": b"", "more": 1})), "expected only"),
    (lambda p: p.__setitem__(PACKED, ArrayRecord({"records": Array(np.arange(4, dtype=np.uint8))})), "byte array"),
    (lambda p: p.__setitem__(PACKED, ConfigRecord({"records": _serialize_nested()})), "appears twice"),
    (lambda p: p.__setitem__(PACKED, ConfigRecord({"records": _serialize_big()})), "travel as an array"),
    (lambda p: p.__setitem__("sync", ConfigRecord({"fedembed.record": _serialize_nested()})), "one packed array"),
])
def test_a_malformed_packed_message_is_refused_saying_what_was_wrong(mangle, says):
    packed = pack(_reply())
    mangle(packed)
    with pytest.raises(PackingError, match=says):
        unpack(packed)


def _serialize_nested() -> bytes:
    from fedembed.apps import packing

    return packing._serialize({PACKED: ConfigRecord({"records": b""})})


def _serialize_big() -> bytes:
    from fedembed.apps import packing

    return packing._serialize({"update": ArrayRecord({"x": Array(np.ones(100_000, np.float32))})})


def test_packing_a_message_that_already_holds_the_packed_name_is_refused():
    with pytest.raises(PackingError):
        pack(RecordDict({PACKED: ConfigRecord({"x": 1})}))


@pytest.fixture
def serverapp_task(monkeypatch):
    """The identity Flower gives the ServerApp's process (a message it builds carries its run and task)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 2), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """A Grid that answers every message at once with what ``answer(node, content)`` returns."""

    def __init__(self, answer) -> None:
        self.answer, self.sent, self.replies = answer, [], []

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            self.sent.append(m)
            m.metadata.__dict__["_message_id"] = f"m{i}"
            ids.append(f"m{i}")
            content = self.answer(m.metadata.dst_node_id, m.content)
            meta = Metadata(run_id=1, message_id=f"r{i}", src_node_id=m.metadata.dst_node_id, dst_node_id=1,
                            reply_to_message_id=f"m{i}", group_id="", created_at=time.time(), ttl=60.0,
                            message_type=m.metadata.message_type)
            self.replies.append(Message(content, metadata=meta))
        return ids

    def pull_messages(self, ids):
        out = [r for r in self.replies if r.metadata.reply_to_message_id in set(ids)]
        self.replies = [r for r in self.replies if r not in out]
        return out


def test_a_deployed_serverapp_sends_packed_and_reads_replies_unpacked_refusing_a_malformed_one(serverapp_task):
    def organisation(node: int, content: RecordDict) -> RecordDict:
        seen = unpack(content)
        assert dict(seen["config"]) == {"node": node}
        if node == 2:
            broken = pack(_reply())
            broken["junk"] = ConfigRecord({"x": 1})
            return broken
        return pack(_reply())

    grid = FakeGrid(organisation)
    transport = GridTransport(grid, poll_seconds=0.0, pack=True)
    replies = {r.node: r for r in transport.exchange("train", {n: RecordDict({"config": ConfigRecord({"node": n})})
                                                               for n in (1, 2)}, timeout=10)}
    assert all(is_packed(m.content) for m in grid.sent)
    assert replies[1].error is None and content_digest(replies[1].content) == content_digest(_reply())
    assert replies[2].content is None and "malformed reply" in replies[2].error and "'junk'" in replies[2].error


def test_a_simulated_serverapp_sends_as_before(serverapp_task):
    grid = FakeGrid(lambda node, content: content)
    transport = GridTransport(grid, poll_seconds=0.0)
    (reply,) = transport.exchange("train", {1: _reply()}, timeout=10)
    assert not is_packed(grid.sent[0].content) and content_digest(reply.content) == content_digest(_reply())


def test_a_message_that_answers_nothing_the_serverapp_sent_is_dropped(serverapp_task):
    """A hostile organisation pushed instruction messages to the SuperLink's own node, which Flower hands to the
    ServerApp with the replies: each was read as a reply of "node 1" (the gate now refuses the push too)."""
    grid = FakeGrid(lambda node, content: content)
    pull = grid.pull_messages

    def with_injected(ids):
        meta = Metadata(run_id=1, message_id="x", src_node_id=1, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=60.0, message_type="train")
        return [Message(_reply(), metadata=meta), *pull(ids)]

    grid.pull_messages = with_injected
    replies = GridTransport(grid, poll_seconds=0.0).exchange("train", {5: _reply()}, timeout=10)
    assert [(r.node, r.error) for r in replies] == [(5, None)]


def _message(content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=5, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=600.0, message_type="train")
    return Message(content, metadata=meta)


def test_the_clientapp_unpacks_before_anything_sees_the_message_and_packs_its_reply():
    seen = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(sorted(msg.content.keys()))
        return Message(_reply(), reply_to=msg)

    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = PackingMod()(_message(pack(RecordDict({"config": ConfigRecord({"round": 1})}))), ctx, handler)
    assert seen == [["config"]] and is_packed(reply.content)
    assert content_digest(unpack(reply.content)) == content_digest(_reply())
    plain = PackingMod()(_message(RecordDict({"config": ConfigRecord({"round": 1})})), ctx, handler)
    assert not is_packed(plain.content)  # an unpacked message gets an unpacked reply
    with pytest.raises(PackingError):  # Flower turns it into an error reply naming it
        PackingMod()(_message(RecordDict({PACKED: ConfigRecord({"records": b"\xff"})})), ctx, handler)


def test_the_supernode_unpacks_for_the_worker_and_packs_its_signed_reply(tmp_path):
    from test_deploy_handoff import SuperNode

    seen = []

    def worker(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
        seen.append(sorted(content.keys()))
        return _reply()

    node = SuperNode(worker)
    msg = node.coordinator_sends(pack(RecordDict({"config": ConfigRecord({"round": 1}),
                                                  "sync": ArrayRecord({"x": Array(np.arange(3.0))})})))
    node.step()
    reply = node.reply_to(msg)
    assert seen == [["config", "sync"]] and is_packed(reply.content)
    assert content_digest(unpack(reply.content)) == content_digest(_reply())
    bad = node.coordinator_sends(RecordDict({PACKED: ConfigRecord({"records": b"\xff"})}))
    node.step()
    err = node.reply_to(bad)
    assert err.has_error() and "malformed message from the coordinator" in err.error.reason and len(seen) == 1


