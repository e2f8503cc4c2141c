"""Flower's fixed waits as fedembed's processes shorten them (fedembed.apps.latency)."""

from __future__ import annotations

import time
import types

import pytest
from flwr.supercore.inflatable import inflatable_utils

from fedembed.apps import latency
from fedembed.apps.latency import PollingClock, shorten_object_pulls


def _module_with_flowers_pull_objects() -> types.ModuleType:
    module = types.ModuleType("fake_flower_module")
    module.pull_objects = inflatable_utils.pull_objects
    return module


def test_an_object_still_being_uploaded_is_asked_for_again_within_a_fraction_of_flowers_second():
    asks: list[float] = []

    def pull_object(object_id: str) -> bytes:
        asks.append(time.monotonic())
        if len(asks) == 1:  # the sender has not finished uploading it
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    module = _module_with_flowers_pull_objects()
    shorten_object_pulls(module)
    assert module.pull_objects(["abc"], pull_object) == {"abc": b"content"}
    assert len(asks) == 2
    assert asks[1] - asks[0] < 0.5  # Flower's own first retry waits 1 s (+-20%)


def test_shortening_keeps_what_the_caller_asked_for_and_is_done_once():
    seen: list[dict] = []
    module = types.ModuleType("m")
    module.pull_objects = lambda *a, **kw: seen.append(kw)
    shorten_object_pulls(module)
    once = module.pull_objects
    shorten_object_pulls(module)
    assert module.pull_objects is once
    module.pull_objects([], None)
    module.pull_objects([], None, initial_backoff=3.0)
    assert seen[0] == {"initial_backoff": latency.PULL_INITIAL_BACKOFF, "backoff_cap": latency.PULL_BACKOFF_CAP}
    assert seen[1]["initial_backoff"] == 3.0


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    out: list[float] = []
    monkeypatch.setattr(latency._time, "sleep", out.append)
    return out


def test_the_supernode_polls_fast_after_a_message_and_backs_off_to_the_cap_while_idle(slept):
    clock = PollingClock(cap=0.2, local=0.02, fast=0.02)
    clock.sleep(3)  # before any message: at the cap
    clock.sleep(0.5)  # waiting for a reply in its own state: cut to `local`
    for _ in range(6):
        clock.sleep(3)  # the SuperLink had nothing
    assert slept == pytest.approx([0.2, 0.02, 0.02, 0.04, 0.08, 0.16, 0.2, 0.2])


def test_the_supernode_clock_is_the_time_module_otherwise():
    clock = PollingClock(cap=0.2, local=0.02)
    assert clock.monotonic() <= time.monotonic() and clock.time is time.time


def test_the_supernode_polls_fast_again_once_it_has_answered_a_message(slept):
    clock = PollingClock(cap=0.2, local=0.02, fast=0.02)
    for _ in range(4):
        clock.sleep(3)  # idle: backing off to the cap
    clock.message_answered()  # the SuperNode handed a message to its worker and stored the reply
    clock.sleep(3)
    assert slept[-1] == pytest.approx(0.02)


def test_the_coordinators_superexec_polls_twice_a_second_even_under_an_organisations_environment(tmp_path, monkeypatch):
    from fedembed.deploy import CoordinatorProcess, ServerOptions, flower_env
    from fedembed.deploy.server import SUPEREXEC_POLL_SECONDS

    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in flower_env()
    for key, value in flower_env().items():  # e.g. a script that starts `fedembed server` with flower_env()
        monkeypatch.setenv(key, value)
    coord = CoordinatorProcess(ServerOptions(state_dir=tmp_path / "s", insecure=True))
    assert coord.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == SUPEREXEC_POLL_SECONDS
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")  # the user's choice wins
    assert CoordinatorProcess(ServerOptions(state_dir=tmp_path / "s", insecure=True)).env[
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"


def test_after_a_poll_the_gate_held_open_the_supernode_polls_again_at_once(slept, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(latency._time, "monotonic", lambda: now[0])
    clock = PollingClock(cap=0.2, local=0.02, fast=0.02, held=1.0)
    now[0] += 10.0  # the empty poll took 10 s: the coordinator's gate held it open
    clock.sleep(3)
    assert slept == []
    clock.sleep(3)  # an empty poll answered at once (a gate that holds nothing): the usual backoff
    assert slept == [pytest.approx(0.2)]


def test_the_supernodes_http_client_keeps_idle_connections_while_its_poll_is_held():
    import httpx

    from fedembed.apps.latency import KEEP_ALIVE_SECONDS, keep_connections

    module = types.ModuleType("flower_protobuf_client")
    module.httpx = httpx
    keep_connections(module)
    wrapped = module.httpx
    keep_connections(module)
    assert module.httpx is wrapped and module.httpx.Limits is httpx.Limits  # the rest is httpx's own
    client = module.httpx.Client(timeout=30.0)
    assert client._transport._pool._keepalive_expiry == KEEP_ALIVE_SECONDS  # httpx's own default: 5 s
    client.close()
