"""The organisation worker: the per-message ClientApp forwards to it, it survives bad input, only its user reaches it."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from conftest import run_config, serving_worker
from fedembed.task import task_node_config
from fedembed.coordinator import Coordinator, Reply
from fedembed.deploy import (
    ClientOptions,
    WorkerProcess,
    flower_env,
    node_config,
    supernode_command,
    tables_digest,
)
from fedembed.identity import make_identities
from fedembed.task import TaskSpec
from fedembed.worker import Worker, WorkerError, WorkerUnavailable, forward, socket_path

ROOT = Path(__file__).resolve().parents[1]


def _content() -> RecordDict:
    return RecordDict({
        "config": ConfigRecord({"round": 3, "mode": "fedembed", "blob": b"\x00\x01", "names": ["a", "b"]}),
        "update": ArrayRecord({"rows": Array(np.arange(12, dtype=np.float32).reshape(3, 4))}),
        "metrics": MetricRecord({"loss": 0.25}),
    })


def _echo(message_type: str, node_id: int, content: RecordDict) -> RecordDict:
    if message_type == "boom":
        raise ValueError("this organisation refuses the plan")
    out = RecordDict(dict(content.items()))
    out["echo"] = ConfigRecord({"message_type": message_type, "node_id": node_id})
    return out


@pytest.fixture
def echo_worker(tmp_path):
    yield from serving_worker(tmp_path / "org", _echo)


def test_forward_round_trips_a_recorddict_through_the_worker(echo_worker):
    out = forward(echo_worker.path, "train", 1234, _content(), timeout=30)
    assert dict(out["echo"]) == {"message_type": "train", "node_id": 1234}
    assert dict(out["config"]) == dict(_content()["config"])
    np.testing.assert_array_equal(out["update"]["rows"].numpy(), _content()["update"]["rows"].numpy())
    assert out["metrics"]["loss"] == 0.25


def test_socket_is_owner_only_in_an_owner_only_directory(echo_worker):
    assert stat.S_IMODE(os.stat(echo_worker.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(echo_worker.path.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(echo_worker.path).st_mode)


def test_a_failing_message_is_an_error_reply_and_the_worker_keeps_serving(echo_worker):
    with pytest.raises(WorkerError, match="refuses the plan"):
        forward(echo_worker.path, "boom", 1, _content(), timeout=30)
    assert dict(forward(echo_worker.path, "train", 2, _content(), timeout=30)["echo"])["node_id"] == 2


def _raw(path: Path, data: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


@pytest.mark.parametrize("garbage", [
    struct.pack(">Q", 5) + b"{oops" + struct.pack(">Q", 3) + b"xyz",  # not JSON, not a RecordDict
    struct.pack(">Q", 20) + json.dumps({"message_type": "x"}).encode()[:20] + struct.pack(">Q", 0),  # no node id
    struct.pack(">Q", 1 << 62),  # a frame over the size limit
    struct.pack(">Q", 100) + b"short",  # a frame cut off
    b"\x00\x01",  # not even a frame
])
def test_a_bad_request_gets_an_error_reply_and_the_worker_keeps_serving(echo_worker, garbage):
    reply = _raw(echo_worker.path, garbage)
    if reply:  # a cut-off request may just be dropped; anything answered is an error
        (n,) = struct.unpack(">Q", reply[:8])
        assert json.loads(reply[8:8 + n])["ok"] is False
    assert dict(forward(echo_worker.path, "train", 7, _content(), timeout=30)["echo"])["node_id"] == 7


def test_no_worker_listening_is_unavailable_so_the_clientapp_handles_it_itself(tmp_path):
    with pytest.raises(WorkerUnavailable):
        forward(tmp_path / "nobody" / "sock", "train", 1, _content())


def test_a_second_worker_on_the_same_state_dir_is_refused(echo_worker):
    with pytest.raises(RuntimeError, match="already answers"):
        Worker(echo_worker.path, _echo)


FORWARDER = r"""
import sys
import time
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
import fedembed.apps.client as app

meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=5, reply_to_message_id="", group_id="",
                created_at=time.time(), ttl=600.0, message_type="train")
msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), metadata=meta)
ctx = Context(run_id=1, node_id=5, node_config={"worker-socket": sys.argv[1]}, state=RecordDict(), run_config={})
reply = app.via_worker(msg, ctx)
assert reply is not None and dict(reply.content["echo"])["node_id"] == 5, reply
heavy = sorted(m for m in ("torch", "fedembed.org", "fedembed.task", "fedembed.model", "fedembed.train", "scipy",
                           "dp_accounting") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_the_forwarding_clientapp_imports_neither_torch_nor_the_task(echo_worker):
    # nor scipy or dp-accounting (0.6-1.2 s a message under a stock SuperNode, once the DP accounting came in)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", FORWARDER, str(echo_worker.path)], env=env, capture_output=True,
                         text=True, timeout=120, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout


# ------------------------------------------------------------------ real organisations behind workers


def _opts(tmp_path: Path, roster, org: int, orgs: int = 3) -> ClientOptions:
    roster_file = roster.write(tmp_path / "roster.json")
    spec = _synthetic(orgs).for_org(org, orgs)  # the organisation's own task, in its own node config
    task = task_node_config(spec)
    return ClientOptions(superlink="127.0.0.1:1", org=org, state_dir=tmp_path / f"org-{org}", insecure=True,
                         identity_key=tmp_path / "keys" / f"{org}.key", roster=roster_file,
                         extra_node_config={**task, "secure-colluders": "1", "secure-row-sets": json.dumps("union,dense")})


class WorkerTransport:
    """Delivers coordinator messages to organisations' workers (real ``python -m fedembed.worker`` processes)."""

    def __init__(self, tmp_path: Path, num_orgs: int) -> None:
        self.roster = make_identities([f"org-{i}" for i in range(num_orgs)], tmp_path / "keys")
        self.workers = {}
        env = flower_env()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        for i in range(num_orgs):
            opts = _opts(tmp_path, self.roster, i, num_orgs)
            opts.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            w = WorkerProcess(opts, env)
            assert w.start(), f"worker {i} did not start"
            self.workers[100 + i] = w

    def node_ids(self, minimum: int, timeout: float) -> list[int]:
        return sorted(self.workers)

    def exchange(self, message_type, contents, timeout):
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type, contents, timeout):
        for node, content in contents.items():
            try:
                yield Reply(node, forward(self.workers[node].path, message_type, node, content, timeout=120))
            except WorkerError as exc:
                yield Reply(node, None, str(exc))

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()


def _synthetic(orgs: int = 3) -> TaskSpec:
    return TaskSpec("synthetic", {"orgs": orgs, "seed": 0, "rows": 2000, "dim": 4})


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True])
def test_a_run_through_workers_equals_the_in_process_run(tmp_path, direct_transport, secure):
    cfg = run_config(_synthetic(), rounds=2, secure=secure, row_set="union")
    t = WorkerTransport(tmp_path / "w", 3)
    try:
        via_workers = Coordinator(cfg, t, state_dir=tmp_path / "w" / "coord")
        via_workers.run()
    finally:
        t.close()
    in_process = Coordinator(cfg, direct_transport(tmp_path / "d", 3, task=_synthetic()), state_dir=tmp_path / "d" / "coord")
    in_process.run()
    assert tables_digest(via_workers.tables.tables) == tables_digest(in_process.tables.tables)


def test_a_worker_that_dies_is_started_again_and_a_stopped_one_removes_its_socket(tmp_path):
    t = WorkerTransport(tmp_path, 1)
    w = t.workers[100]
    try:
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
        assert not w.listening()
        w.ensure()
        assert w.listening() and w.starts == 2
        with pytest.raises(WorkerError, match="unknown message type"):  # a real organisation refuses, keeps serving
            forward(w.path, "nonsense", 100, _content(), timeout=60)
        assert w.listening()
    finally:
        t.close()
    assert not w.path.exists()


def test_node_config_names_the_worker_socket_only_when_there_is_one(tmp_path):
    roster = make_identities(["org-0"], tmp_path / "keys")
    opts = _opts(tmp_path, roster, 0)
    assert "worker-socket" not in node_config(opts)
    from flwr.common.config import parse_config_args

    nc = parse_config_args([node_config(opts, socket_path(opts.state_dir))])
    assert nc["worker-socket"] == str(socket_path(opts.state_dir)) and nc["org"] == 0


def test_node_config_writes_org_only_when_given_and_the_orgs_own_task_before_the_extras(tmp_path):
    from flwr.common.config import parse_config_args

    roster = make_identities(["org-0"], tmp_path / "keys")
    task = {"task": json.dumps("examples.my_task:ClicksTask"), "data": json.dumps("/data/shop"),
            "task-options": json.dumps("products=400"), "device": json.dumps("cpu")}
    opts = ClientOptions(superlink="127.0.0.1:1", state_dir=tmp_path / "org", insecure=True,
                         identity_key=tmp_path / "keys" / "0.key", roster=roster.write(tmp_path / "roster.json"),
                         task_config=task, extra_node_config={"secure-colluders": "1"})
    assert opts.org is None
    nc = parse_config_args([node_config(opts)])
    assert "org" not in nc
    assert list(nc) == ["state-dir", "identity-key", "roster", "task", "data", "task-options", "device",
                        "secure-colluders"]
    assert nc["task"] == "examples.my_task:ClicksTask" and nc["task-options"] == "products=400"
    indexed = parse_config_args([node_config(_opts(tmp_path, roster, 0))])
    assert next(iter(indexed)) == "org" and indexed["org"] == 0


def test_the_processes_fedembed_starts_let_idle_torch_threads_sleep_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert flower_env()["OMP_WAIT_POLICY"] == "PASSIVE"  # spinning threads starve the other processes
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert flower_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_with_a_worker_the_supernode_hands_it_every_message_and_starts_no_clientapp(tmp_path):
    roster = make_identities(["org-0"], tmp_path / "keys")
    opts = _opts(tmp_path, roster, 0)
    sock = socket_path(opts.state_dir)
    cmd = supernode_command(opts, 9999, worker_socket=sock, handoff=True)
    assert cmd[1:3] == ["-m", "fedembed.deploy.supernode"]
    assert cmd[cmd.index("--worker-socket") + 1] == str(sock) and cmd[cmd.index("--isolation") + 1] == "process"
    assert "--superexec-auth-secret-file" not in cmd  # no Runtime API, so no claims to sign
    # no worker: Flower's default, a ClientApp per message (forwarding to the socket if one answers)
    default = supernode_command(opts, 9999, worker_socket=sock)
    assert "--isolation" not in default and "--worker-socket" not in default
    with pytest.raises(ValueError):
        supernode_command(opts, 9999, stock=True, worker_socket=sock, handoff=True)  # the stock one cannot
    assert WorkerProcess(opts, {}).command()[-4:] == ["--socket", str(sock), "--node-config", node_config(opts)]


def test_a_node_key_of_one_member_with_the_identity_of_another_is_refused_at_start(tmp_path):
    """Configured with org-1's node key and org-0's identity, a client would answer as org-0 and knock the real
    org-0 out of every round (the coordinator counts a name once): refused before it starts."""
    from fedembed.certs import write_test_certs
    from fedembed.config import ConfigError

    c = write_test_certs(tmp_path / "certs", orgs=2)
    roster = tmp_path / "certs"
    common = {"superlink": "127.0.0.1:1", "state_dir": tmp_path / "org", "root_cert": c.ca_cert, "roster": roster}
    with pytest.raises(ConfigError, match="--auth-key is the roster key of 'org-1' but --identity-key is that of 'org-0'"):
        ClientOptions(**common, auth_key=tmp_path / "certs" / "org-1.key", identity_key=tmp_path / "certs" / "org-0.key")
    assert ClientOptions(**common, auth_key=tmp_path / "certs" / "org-1.key").name == "org-1"  # control: its own key
