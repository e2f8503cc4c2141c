"""The Fleet gate's long poll and its wake-ups with the ServerApp (fedembed.deploy.fleetgate, fedembed.apps.wakeup).

The gate runs in this process as the ASGI application it is, in front of a stand-in
SuperLink (an ``httpx`` mock transport answering Flower's Fleet protobufs); the
ServerApp's end of the wake-ups is a real owner-only datagram socket.
"""

from __future__ import annotations

import asyncio
import os
import stat

import httpx
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
)
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611

from fedembed.apps.wakeup import Wakeups
from fedembed.deploy.fleetgate import PULL_MESSAGES, PUSH_MESSAGES, FleetGate

NODE = 7


async def _streamed(data: bytes):
    yield data


def _response(status: int, data: bytes) -> httpx.Response:
    return httpx.Response(status, content=_streamed(data))  # streamed, as from the network


class SuperLink:
    """Answers pull-messages (empty until a message is queued) and push-messages; counts what it was asked."""

    def __init__(self) -> None:
        self.queued: list[ProtoMessage] = []
        self.pulls = 0
        self.objects_to_push: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == PULL_MESSAGES:
            self.pulls += 1
            try:
                PullMessagesRequest.FromString(request.content)
            except Exception:  # noqa: BLE001 - Flower answers a malformed request with an error
                return _response(400, b"bad request")
            res = PullMessagesResponse(messages_list=self.queued[:1])
            self.queued = self.queued[1:]
            return _response(200, res.SerializeToString())
        res = PushMessagesResponse(objects_to_push=self.objects_to_push, session_id="s")
        return _response(200, res.SerializeToString())


class Call:
    """One HTTP request to the gate, as uvicorn hands it over; ``hang_up()`` is the SuperNode going away."""

    def __init__(self, path: str, body: bytes) -> None:
        self.path, self.body = path, body
        self.sent: list[dict] = []
        self._gone = asyncio.Event()
        self._read = False

    async def receive(self) -> dict:
        if not self._read:
            self._read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def hang_up(self) -> None:
        self._gone.set()

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def scope(self) -> dict:
        return {"type": "http", "method": "POST", "path": self.path, "raw_path": self.path.encode(),
                "headers": [(b"content-type", b"application/protobuf")], "client": ("127.0.0.1", 5000)}


async def _started(gate: FleetGate) -> None:
    msgs = iter([{"type": "lifespan.startup"}])
    started = asyncio.Event()

    async def receive():
        try:
            return next(msgs)
        except StopIteration:
            await asyncio.Event().wait()  # never shut down during the test

    async def send(message):
        started.set()

    asyncio.get_running_loop().create_task(gate(({"type": "lifespan"}), receive, send))
    await started.wait()


def _gate(tmp_path, link: SuperLink, **kw) -> FleetGate:
    gate = FleetGate("https://127.0.0.1:1", verify=False, wakeup_dir=tmp_path, **kw)
    gate.client = httpx.AsyncClient(base_url="https://127.0.0.1:1", transport=httpx.MockTransport(link.handle))
    return gate


def _pull(node: int = NODE) -> Call:
    return Call(PULL_MESSAGES, PullMessagesRequest(node=Node(node_id=node)).SerializeToString())


def _message() -> ProtoMessage:
    msg = ProtoMessage()
    msg.metadata.message_id = "m1"
    return msg


def run(coro):
    return asyncio.run(coro)


def test_an_empty_poll_is_held_until_the_serverapp_has_pushed_and_then_answered_with_the_message(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=60.0, recheck=60.0)
        await _started(gate)
        serverapp = Wakeups.serverapp(tmp_path)
        call = _pull()
        task = asyncio.create_task(gate(call.scope(), call.receive, call.send))
        await asyncio.sleep(0.2)
        assert not call.sent and link.pulls == 1  # held: nothing for it yet
        link.queued.append(_message())
        assert serverapp.wake_other()  # what the ServerApp does once it has pushed a stage's messages
        await asyncio.wait_for(task, 30)
        assert call.status == 200 and link.pulls == 2
        assert [m.metadata.message_id for m in PullMessagesResponse.FromString(call.content).messages_list] == ["m1"]
        serverapp.close()

    run(scenario())


def test_a_held_poll_asks_again_at_its_own_pace_and_ends_empty_after_the_hold(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=0.5, recheck=0.1)
        await _started(gate)
        call = _pull()
        await asyncio.wait_for(gate(call.scope(), call.receive, call.send), 30)
        assert call.status == 200 and not PullMessagesResponse.FromString(call.content).messages_list
        assert 3 <= link.pulls <= 7  # every 0.1 s for 0.5 s, without any wake-up

    run(scenario())


def test_a_node_told_nothing_is_not_asked_for_again_until_the_serverapp_pushes(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=0.2, recheck=60.0)
        await _started(gate)
        first = _pull()
        await asyncio.wait_for(gate(first.scope(), first.receive, first.send), 30)
        assert link.pulls == 2  # asked when it came and at the end of the hold: nothing
        gate.hold = 60.0
        again = _pull()  # back at once, nothing pushed meanwhile: held without asking the SuperLink
        task = asyncio.create_task(gate(again.scope(), again.receive, again.send))
        await asyncio.sleep(0.3)
        assert link.pulls == 2 and not again.sent
        link.queued.append(_message())
        serverapp = Wakeups.serverapp(tmp_path)
        assert serverapp.wake_other()
        await asyncio.wait_for(task, 30)
        assert link.pulls == 3 and PullMessagesResponse.FromString(again.content).messages_list
        third = _pull()  # back with its reply answered: the next message comes with the next push
        task = asyncio.create_task(gate(third.scope(), third.receive, third.send))
        await asyncio.sleep(0.3)
        assert link.pulls == 3 and not third.sent
        third.hang_up()
        await asyncio.wait_for(task, 30)
        serverapp.close()

    run(scenario())


def test_a_forged_wakeup_costs_each_held_poll_one_more_question_and_nothing_else(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=60.0, recheck=60.0)
        await _started(gate)
        calls = [_pull(node) for node in (1, 2)]
        tasks = [asyncio.create_task(gate(c.scope(), c.receive, c.send)) for c in calls]
        await asyncio.sleep(0.2)
        assert link.pulls == 2
        forger = Wakeups(tmp_path / "forger", tmp_path / "gate")
        assert forger.wake_other()
        await asyncio.sleep(0.3)
        assert link.pulls == 4 and not any(c.sent for c in calls)  # asked once more each, still held
        for c in calls:
            c.hang_up()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        forger.close()

    run(scenario())


def test_a_supernode_that_hangs_up_while_held_is_asked_for_no_more(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=60.0, recheck=0.05)
        await _started(gate)
        call = _pull()
        task = asyncio.create_task(gate(call.scope(), call.receive, call.send))
        await asyncio.sleep(0.2)
        call.hang_up()
        await asyncio.wait_for(task, 30)
        asked = link.pulls
        link.queued.append(_message())
        await asyncio.sleep(0.3)
        assert link.pulls == asked and link.queued  # the message stays for the SuperNode's next poll
        assert not call.sent

    run(scenario())


def test_held_polls_are_answered_when_the_gate_shuts_down(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=60.0, recheck=60.0)
        await _started(gate)
        call = _pull()
        task = asyncio.create_task(gate(call.scope(), call.receive, call.send))
        await asyncio.sleep(0.2)
        gate.release_held()  # what the gate's server does before it waits for open requests
        await asyncio.wait_for(task, 30)
        assert call.status == 200 and not PullMessagesResponse.FromString(call.content).messages_list
        again = _pull()
        await asyncio.wait_for(gate(again.scope(), again.receive, again.send), 30)  # and holds no more
        assert again.status == 200

    run(scenario())


def test_a_reply_pushed_whole_wakes_the_serverapp(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=0.05, recheck=0.05)
        await _started(gate)
        serverapp = Wakeups.serverapp(tmp_path)
        push = Call(PUSH_MESSAGES, PushMessagesRequest(node=Node(node_id=NODE)).SerializeToString())
        link.objects_to_push = ["a", "b"]  # the reply's objects follow in requests of their own
        await gate(push.scope(), push.receive, push.send)
        assert push.status == 200 and PushMessagesResponse.FromString(push.content).objects_to_push == ["a", "b"]
        assert not serverapp.wait(0.2)  # not yet: its objects are still coming
        other = _pull(NODE + 1)  # another organisation's poll says nothing about this reply
        await gate(other.scope(), other.receive, other.send)
        assert not serverapp.wait(0.1)
        back = _pull()  # the SuperNode is back for its next message: it has pushed everything
        await gate(back.scope(), back.receive, back.send)
        assert serverapp.wait(5)
        link.objects_to_push = []  # a reply with nothing more to push is whole at once
        push = Call(PUSH_MESSAGES, PushMessagesRequest(node=Node(node_id=NODE)).SerializeToString())
        await gate(push.scope(), push.receive, push.send)
        assert serverapp.wait(5)
        serverapp.close()

    run(scenario())


def test_a_request_the_gate_cannot_read_is_forwarded_unheld(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = _gate(tmp_path, link, hold=60.0, recheck=60.0)
        await _started(gate)
        call = Call(PULL_MESSAGES, b"\xff\xff not a protobuf")
        await asyncio.wait_for(gate(call.scope(), call.receive, call.send), 30)
        assert call.status == 400 and link.pulls == 1  # the SuperLink's own answer, at once

    run(scenario())


def test_without_a_wakeup_directory_the_gate_holds_nothing(tmp_path):
    async def scenario():
        link = SuperLink()
        gate = FleetGate("https://127.0.0.1:1", verify=False)
        gate.client = httpx.AsyncClient(base_url="https://127.0.0.1:1", transport=httpx.MockTransport(link.handle))
        await _started(gate)
        call = _pull()
        await asyncio.wait_for(gate(call.scope(), call.receive, call.send), 30)
        assert call.status == 200 and link.pulls == 1

    run(scenario())


def test_the_wakeup_sockets_are_owner_only(tmp_path):
    gate, serverapp = Wakeups.gate(tmp_path), Wakeups.serverapp(tmp_path)
    for end in (gate, serverapp):
        assert stat.S_IMODE(os.stat(end.path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(end.path).st_mode)
    assert serverapp.wake_other() and gate.wait(5) and not gate.wait(0)  # several wake-ups read as one
    gate.close()
    assert not serverapp.wake_other()  # nobody listening: not an error
    serverapp.close()
    assert not (tmp_path / "gate").exists() and not (tmp_path / "serverapp").exists()


# ------------------------------------------------------------------ what the gate refuses before the SuperLink sees it
class CountingSuperLink(SuperLink):
    """Counts every request the gate forwards, by path."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.path)
        return super().handle(request)


def _pushed(*messages: ProtoMessage, node: int = NODE) -> Call:
    return Call(PUSH_MESSAGES, PushMessagesRequest(node=Node(node_id=node), messages_list=list(messages)).SerializeToString())


def _reply(src: int = NODE, dst: int = 1, reply_to: str = "m0") -> ProtoMessage:
    msg = ProtoMessage()
    msg.metadata.message_id, msg.metadata.src_node_id, msg.metadata.dst_node_id = "r1", src, dst
    msg.metadata.reply_to_message_id = reply_to
    return msg


def test_a_supernode_pushing_anything_but_its_own_reply_to_the_superlink_is_refused(tmp_path):
    """Flower's Fleet API stores a pushed message without reply_to as an instruction "from the SuperLink" to any
    node named: a hostile organisation sent another a train message of round 2973 (locking it out of the run for
    2,000 rounds), and handed the ServerApp messages it never asked for (stalling a round 160 s)."""
    from fedembed.deploy.fleetgate import FleetGate as Gate

    async def scenario():
        for wakeups in (True, False):  # watched (held polls) or not: the same check
            link = CountingSuperLink()
            gate = _gate(tmp_path, link) if wakeups else Gate("https://127.0.0.1:1", verify=False)
            if not wakeups:
                gate.client = httpx.AsyncClient(base_url="https://127.0.0.1:1", transport=httpx.MockTransport(link.handle))
            await _started(gate)
            for bad in (_reply(reply_to=""),  # an instruction
                        _reply(dst=NODE + 1),  # to another organisation
                        _reply(src=NODE + 1)):  # in another node's name
                call = _pushed(bad)
                await gate(call.scope(), call.receive, call.send)
                assert call.status == 403 and b"pushes only its own replies" in call.content
            assert link.seen == []  # none of it reached the SuperLink
            good = _pushed(_reply())  # the control: its own reply, to the SuperLink
            await gate(good.scope(), good.receive, good.send)
            assert good.status == 200 and link.seen == [PUSH_MESSAGES]

    run(scenario())


def test_a_body_over_the_limit_is_refused_before_the_superlink_reads_any_of_it(tmp_path):
    """The SuperLink reads a whole body into memory before it checks who sent it: one 1 GB request from an
    outsider with no key cost it 2 GB (and more, request by request)."""
    from fedembed.deploy.fleetgate import BODY_LIMIT

    async def scenario():
        link = CountingSuperLink()
        gate = _gate(tmp_path, link)
        await _started(gate)
        big = Call("/v1/fleet/get-run", b"\x00" * (BODY_LIMIT + 1))
        await gate(big.scope(), big.receive, big.send)
        assert big.status == 413 and link.seen == []
        small = Call("/v1/fleet/get-run", b"")  # the control
        await gate(small.scope(), small.receive, small.send)
        assert link.seen == ["/v1/fleet/get-run"]

    run(scenario())


def test_a_reply_over_the_coordinators_message_limit_is_refused_object_by_object(tmp_path):
    """--max-message-bytes was checked after the ServerApp had pulled and unpacked a reply whole (300 MB replies
    each cost it 1.2 GB); the gate now counts a node's objects for one reply and refuses past the limit."""
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611

    def obj(size: int, node: int = NODE) -> Call:
        return Call("/v1/fleet/push-object",
                    PushObjectRequest(node=Node(node_id=node), object_id="x", object_content=b"\x00" * size).SerializeToString())

    async def scenario():
        link = CountingSuperLink()
        gate = _gate(tmp_path, link, max_reply_bytes=1000)
        await _started(gate)
        start = _pushed(_reply())
        await gate(start.scope(), start.receive, start.send)
        first, second = obj(600), obj(600)
        await gate(first.scope(), first.receive, first.send)
        await gate(second.scope(), second.receive, second.send)
        assert first.status == 200 and second.status == 413 and b"over 1000 bytes" in second.content
        other = obj(600, NODE + 1)  # another node's budget is its own
        await gate(other.scope(), other.receive, other.send)
        assert other.status == 200
        again = _pushed(_reply())  # its next reply starts a new budget
        await gate(again.scope(), again.receive, again.send)
        third = obj(600)
        await gate(third.scope(), third.receive, third.send)
        assert third.status == 200
        # objects pushed in parallel each count against the others (counted after the SuperLink's answer, 2 of 74
        # parallel 0.9 MB chunks got past a 1 MB budget); an object the SuperLink does not take is given back
        fresh = _pushed(_reply())
        await gate(fresh.scope(), fresh.receive, fresh.send)
        parallel = [obj(600) for _ in range(4)]
        await asyncio.gather(*(gate(c.scope(), c.receive, c.send) for c in parallel))
        assert sorted(c.status for c in parallel) == [200, 413, 413, 413]

    run(scenario())


def test_an_object_the_superlink_refuses_is_given_back_to_the_reply_budget(tmp_path):
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611

    async def scenario():
        link = CountingSuperLink()
        refuse = {"on": True}
        handle = link.handle
        link.handle = lambda request: (_response(401, b"no") if refuse["on"] and request.url.path.endswith("push-object")
                                       else handle(request))
        gate = _gate(tmp_path, link, max_reply_bytes=1000)
        await _started(gate)
        body = PushObjectRequest(node=Node(node_id=NODE), object_id="x", object_content=b"\x00" * 600).SerializeToString()
        spoofed = Call("/v1/fleet/push-object", body)  # e.g. someone else naming this node: the SuperLink says no
        await gate(spoofed.scope(), spoofed.receive, spoofed.send)
        assert spoofed.status == 401
        refuse["on"] = False
        own = Call("/v1/fleet/push-object", body)
        await gate(own.scope(), own.receive, own.send)
        assert own.status == 200  # its budget was not spent by the refused one

    run(scenario())
