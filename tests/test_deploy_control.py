"""Only the Fleet API faces the organisations: real processes on loopback.

A real ``fedembed server`` (TLS, SuperNode authentication for org-0 and org-1) runs a small
synthetic task with two ``fedembed client`` organisations. While the run is going, an
attacker who can reach the coordinator's public port and holds ``ca.crt`` (every
organisation does) tries, with Flower's own ``flwr`` CLI and its Control API client, to
list the nodes, register its own key (org-2's, never listed), unregister org-0, submit a
run of its own and stop the coordinator's run. Each call must be refused by the Fleet gate
(:mod:`fedembed.deploy.fleetgate`). As a control, the same calls with the same client succeed on
the loopback address ``fedembed server`` itself uses (from its ``flwr-home/config.toml``),
so the test fails if the lockdown is removed. The run must still complete with both
organisations in every round.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w
from test_deploy import BIN, RUN, Procs, client_cmd, events, rounds_done, wait_until, write_federation

from fedembed.certs import write_test_certs
from fedembed.deploy import CoordinatorProcess, ServerOptions, descendants, free_port
from fedembed.deploy.fleetgate import REFUSAL, fleet_paths

pytestmark = [pytest.mark.slow, pytest.mark.deploy,
              pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")]  # Flower's FAB build

ORGS = 2  # the synthetic task of test_deploy, split between two organisations
GATE_HEADER = "x-fedembed-gate"
OPERATIONS = ["list nodes", "register key", "unregister org-0", "submit run", "stop run"]


# ------------------------------------------------------------------ helpers


def control_client(address: str, ca: Path):
    """Flower's own Control API client (what `flwr` uses), dialling ``address`` with ``ca``."""
    from flwr.supercore.control.control_http_client import ControlHttpClient

    return ControlHttpClient.from_server_address(address, insecure=False, root_certificates=ca.read_bytes(),
                                                 interceptors=[])


def public_key_bytes(pub: Path) -> bytes:
    """A SuperNode public key as Flower's Control API carries it (what `flwr supernode register` sends)."""
    from flwr.cli.supernode.register import try_load_public_key

    return try_load_public_key(pub)


def write_attacker_app(app: Path) -> Path:
    """A Flower App of the attacker's, shipping its own code; ``app = None`` is no ServerApp, so it cannot run."""
    (app / "attacker_app").mkdir(parents=True, exist_ok=True)
    (app / "attacker_app" / "__init__.py").write_text("")
    (app / "attacker_app" / "apps.py").write_text("app = None  # the attacker's code would be here\n")
    doc = {"project": {"name": "attacker-app", "version": "1.0.0", "license": "Apache-2.0", "dependencies": []},
           "tool": {"flwr": {"app": {"publisher": "attacker",
                                     "components": {"serverapp": "attacker_app.apps:app",
                                                    "clientapp": "attacker_app.apps:app"},
                                     "config": {}}}}}
    (app / "pyproject.toml").write_bytes(tomli_w.dumps(doc).encode())
    return app


def start_run_request(app: Path):
    from hashlib import sha256

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab_from_disk(app)
    return StartRunRequest(fab=fab_to_proto(Fab(sha256(fab).hexdigest(), fab, {})))


def call(fn, request) -> dict:
    """Outcome of one Control API call: the response, or the HTTP status and body that refused it."""
    try:
        return {"ok": True, "response": fn(request)}
    except httpx.HTTPStatusError as exc:
        return {"ok": False, "status": exc.response.status_code, "gate": exc.response.headers.get(GATE_HEADER),
                "body": exc.response.text}
    except httpx.HTTPError as exc:  # not a refusal: a broken connection
        return {"ok": False, "status": None, "gate": None, "body": repr(exc)}


def nodes(address: str, ca: Path) -> dict[bytes, tuple[int, str]]:
    """Public key -> (node id, status) of every SuperNode the SuperLink knows, asked on ``address``."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with control_client(address, ca) as c:
        return {n.public_key: (n.node_id, n.status) for n in c.ListNodes(ListNodesRequest()).nodes_info}


def run_statuses(address: str, ca: Path) -> dict[int, str]:
    from flwr.proto.control_pb2 import ListRunsRequest

    with control_client(address, ca) as c:
        return {rid: run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
                for rid, run in c.ListRuns(ListRunsRequest()).run_dict.items()}


def five_calls(address: str, ca: Path, attacker_pub: Path, org0_node: int, run_id: int, app: Path) -> dict[str, dict]:
    """List nodes, register ``attacker_pub``, unregister ``org0_node``, submit ``app``, stop ``run_id``."""
    from flwr.proto.control_pb2 import (
        ListNodesRequest, RegisterNodeRequest, StopRunRequest, UnregisterNodeRequest,
    )

    with control_client(address, ca) as c:
        return {
            "list nodes": call(c.ListNodes, ListNodesRequest()),
            "register key": call(c.RegisterNode, RegisterNodeRequest(public_key=public_key_bytes(attacker_pub))),
            "unregister org-0": call(c.UnregisterNode, UnregisterNodeRequest(node_id=org0_node)),
            "submit run": call(c.StartRun, start_run_request(app)),
            "stop run": call(c.StopRun, StopRunRequest(run_id=run_id)),
        }


def raw_request(port: int, ca: Path, request_line: str, body: bytes = b"",
                content_type: str = "application/protobuf") -> tuple[int, dict[str, str]]:
    """Send one HTTP/1.1 request exactly as written (no client-side path normalising) over TLS."""
    ctx = ssl.create_default_context(cafile=str(ca))
    head = (f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers


def safely(fn):
    """``fn()``, or the exception it raised (for a test to report)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return exc


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process ``pid`` listens on (Linux ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if table == "tcp":
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out.add((addr, int(hexport, 16)))
    return out


def process_with(root_pid: int, needle: str) -> int:
    for pid in descendants(root_pid):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process running {needle!r} under {root_pid}")


# ------------------------------------------------------------------ the scenario


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    c = write_test_certs(tmp_path_factory.mktemp("certs"), orgs=3)  # org-2: the attacker's own key pair
    c.roster = tmp_path_factory.mktemp("roster")  # the federation: organisations 0 and 1
    for k in range(2):
        shutil.copy(c.org_public_keys[k], c.roster / c.org_public_keys[k].name)
    return c


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("control")
    procs = Procs(root)
    try:
        port = free_port()
        state = root / "coordinator"
        t0 = time.monotonic()
        cmd = [str(BIN / "fedembed"), "server", "--federation", str(write_federation(procs, ORGS)), *RUN,
               "--rounds", "2", "--min-orgs", "2", "--start-orgs", "1",
               "--round-timeout", "120", "--state-dir", str(state), "--port", str(port), "--quiet",
               "--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key),
               "--ca-certfile", str(certs.ca_cert),
               "--auth-key", str(certs.org_public_keys[0]), "--auth-key", str(certs.org_public_keys[1])]
        server = procs.start("server", cmd)
        # The run is submitted once org-0 is online and its ServerApp then waits (up to the round
        # timeout) for org-1, which joins only after the attacks: the run is going all along,
        # however fast its rounds are.
        procs.start("org0", client_cmd(0, port, root / "org0", certs, orgs=ORGS))
        wait_until("the ServerApp to start", lambda: any(e.get("event") == "start" for e in events(state)),
                   180, procs, server)
        public = f"127.0.0.1:{port}"
        loopback = tomllib.loads((state / "flwr-home" / "config.toml").read_text())["superlink"]["fedembed"]["address"]
        ca = certs.ca_cert
        superlink_pid = process_with(server.pid, "flower-superlink")
        gate_pid = process_with(server.pid, "fedembed.deploy.fleetgate")
        sockets = {"superlink": listening(superlink_pid), "gate": listening(gate_pid)}

        org0_node = nodes(loopback, ca)[public_key_bytes(certs.org_public_keys[0])][0]
        (run_id,) = run_statuses(loopback, ca)
        app = write_attacker_app(root / "attacker-app")

        # the attacker, from outside: Flower's Control API client on the public port ...
        refused = five_calls(public, ca, certs.org_public_keys[2], org0_node, run_id, app)
        # ... and Flower's CLI with a connection to the public port, the same five calls
        home = root / "attacker-home"
        home.mkdir()
        (home / "config.toml").write_bytes(tomli_w.dumps({"superlink": {
            "default": "coordinator", "coordinator": {"address": public, "root-certificates": str(ca)}}}).encode())
        env = {**procs.env, "FLWR_HOME": str(home)}
        cli_args = {
            "list nodes": ["supernode", "list"],
            "register key": ["supernode", "register", str(certs.org_public_keys[2])],
            "unregister org-0": ["supernode", "unregister", str(org0_node)],
            "submit run": ["run", str(app)],
            "stop run": ["stop", str(run_id)],
        }
        running = {op: subprocess.Popen([str(BIN / "flwr"), *args, "coordinator", "--format", "json"], env=env,
                                        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for op, args in cli_args.items()}
        cli = {}
        for op, p in running.items():
            out, err = p.communicate(timeout=120)
            start = out.find("{")
            cli[op] = {"code": p.returncode, "json": json.loads(out[start:]) if start >= 0 else None, "stderr": err}
        # (should an attack get through and stop the run, the SuperLink is gone: what follows is
        # recorded as an error for the tests to report, not raised here)
        after_attack = safely(lambda: {"nodes": nodes(loopback, ca), "runs": run_statuses(loopback, ca)})

        # control: the same client and calls on the loopback address `fedembed server` uses work. The
        # attacker's key is registered and unregistered again, and its run is stopped at once (its
        # ServerApp cannot be imported anyway); org-0 and the coordinator's run are left alone.
        from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, StopRunRequest, UnregisterNodeRequest

        attacker_key = public_key_bytes(certs.org_public_keys[2])
        with control_client(loopback, ca) as c:
            listed = call(c.ListNodes, ListNodesRequest())
            registered = call(c.RegisterNode, RegisterNodeRequest(public_key=attacker_key))
            submitted = call(c.StartRun, start_run_request(app))
            stopped = (call(c.StopRun, StopRunRequest(run_id=submitted["response"].run_id))
                       if submitted["ok"] else submitted)
            unregistered = (call(c.UnregisterNode, UnregisterNodeRequest(node_id=registered["response"].node_id))
                            if registered["ok"] else registered)
        works = {"list nodes": listed, "register key": registered, "unregister org-0": unregistered,
                 "submit run": submitted, "stop run": stopped}
        after_control = safely(lambda: {"nodes": nodes(loopback, ca), "runs": run_statuses(loopback, ca)})

        # requests a generic HTTP client could craft: other APIs, path tricks, other methods
        tricks = {line: safely(lambda line=line: raw_request(port, ca, line)) for line in [
            "POST /v1/control/list-nodes", "POST /v1/runtime/get-nodes", "POST /v1/runtime/acquire-task",
            "POST /v1/fleet/../control/list-nodes", "POST /v1/fleet/%2e%2e/control/list-nodes",
            "POST /v1/fleet/pull-messages/../../control/list-nodes", "POST //v1/control/list-nodes",
            "POST /v1/control/list-nodes?/v1/fleet/pull-messages", f"POST https://{public}/v1/control/list-nodes",
            "GET /v1/fleet/pull-messages", "GET /docs", "GET /openapi.json", "GET /health",
        ]}
        fleet_call = safely(lambda: raw_request(port, ca, "POST /v1/fleet/activate-node"))  # no SuperNode signature

        procs.start("org1", client_cmd(1, port, root / "org1", certs, orgs=ORGS))
        server.wait(timeout=300)
        return {"root": root, "state": state, "procs": procs, "server_code": server.returncode, "port": port,
                "public": public, "loopback": loopback, "sockets": sockets, "org0_node": org0_node, "run_id": run_id,
                "cli": cli, "refused": refused, "works": works, "after_attack": after_attack,
                "after_control": after_control, "tricks": tricks, "fleet_call": fleet_call,
                "attacker_key": attacker_key, "seconds": time.monotonic() - t0}
    finally:
        procs.kill_all()


# ------------------------------------------------------------------ what must be true


def test_superlink_listens_on_loopback_only_and_the_gate_on_the_public_port(attacked_run):
    run = attacked_run
    host, _, port = run["loopback"].rpartition(":")
    assert host == "127.0.0.1" and int(port) != run["port"]
    assert run["sockets"]["superlink"] == {("127.0.0.1", int(port))}  # and nothing else, public or not
    assert run["sockets"]["gate"] == {("127.0.0.1", run["port"])}


def test_flwr_cli_against_the_public_port_is_refused(attacked_run):
    for op in OPERATIONS:
        out = attacked_run["cli"][op]
        assert out["json"] is not None, f"{op}: {out}"
        assert out["json"]["success"] is False, f"{op}: {out}"
        assert REFUSAL in out["json"]["error-message"], f"{op}: {out}"


def test_control_api_calls_on_the_public_port_are_refused_by_the_gate(attacked_run):
    for op in OPERATIONS:
        got = attacked_run["refused"][op]
        assert not got["ok"], f"{op} went through the public port: {got}"
        assert (got["status"], got["gate"]) == (403, "refused"), f"{op}: {got}"
        assert json.loads(got["body"])["detail"] == REFUSAL


def test_the_same_calls_work_on_the_loopback_control_address(attacked_run):
    """Control: the refused calls are well formed and would have done what the attacker wanted."""
    works = attacked_run["works"]
    assert isinstance(attacked_run["after_control"], dict), attacked_run["after_control"]
    for op in OPERATIONS:
        assert works[op]["ok"], f"{op} failed on the loopback control address: {works[op]}"
    assert attacked_run["org0_node"] in {n.node_id for n in works["list nodes"]["response"].nodes_info}
    assert works["register key"]["response"].node_id > 0
    assert works["submit run"]["response"].run_id > 0
    assert works["stop run"]["response"].success
    assert attacked_run["after_control"]["runs"][works["submit run"]["response"].run_id] == "finished:stopped"
    node, status = attacked_run["after_control"]["nodes"][attacked_run["attacker_key"]]
    assert (node, status) == (works["register key"]["response"].node_id, "unregistered")  # and unregistered again


def test_attacks_changed_nothing_and_both_orgs_trained_every_round(attacked_run):
    run = attacked_run
    after = run["after_attack"]
    assert isinstance(after, dict), f"the SuperLink was gone after the attacks: {after!r}"
    assert run["attacker_key"] not in after["nodes"]  # its key was not registered
    org0 = [status for node, status in after["nodes"].values() if node == run["org0_node"]]
    assert org0 == ["online"]  # org-0 was not unregistered
    assert after["runs"] == {run["run_id"]: "running"}  # no run of the attacker's; ours not stopped
    assert run["server_code"] == 0, run["procs"].log("server")[-3000:]
    doc = json.loads((run["state"] / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["clients"] == 2 and not r["rejected"] for r in doc["rounds"])
    assert len(rounds_done(run["state"])) == 2
    for org in (0, 1):
        assert (run["root"] / f"org{org}" / "head.pt").exists()
    gate_log = (run["state"] / "fleetgate.log").read_text()
    assert "refused POST b'/v1/control/list-nodes'" in gate_log


def test_other_apis_and_path_tricks_are_refused_fleet_calls_reach_flower(attacked_run):
    for line, got in attacked_run["tricks"].items():
        assert not isinstance(got, Exception), f"{line}: {got!r}"
        status, headers = got
        assert (status, headers.get(GATE_HEADER)) == (403, "refused"), f"{line}: {status} {headers}"
    # a Fleet API call passes the gate and meets Flower's own SuperNode authentication
    assert not isinstance(attacked_run["fleet_call"], Exception), attacked_run["fleet_call"]
    status, headers = attacked_run["fleet_call"]
    assert status == 401 and GATE_HEADER not in headers


# ------------------------------------------------------------------ the command lines (no processes)


def test_public_host_binds_the_gate_only_and_flwr_calls_use_loopback(tmp_path, certs):
    opts = ServerOptions(state_dir=tmp_path / "s", host="0.0.0.0", port=9092, certfile=certs.server_cert,
                         keyfile=certs.server_key, ca_certfile=certs.ca_cert, auth_keys=[certs.org_public_keys[0]])
    coord = CoordinatorProcess(opts)
    sl = coord.superlink_command()
    assert sl[sl.index("--host") + 1] == "127.0.0.1" and sl[sl.index("--port") + 1] == str(coord.superlink_port)
    assert coord.superlink_port != 9092
    gate = coord.fleetgate_command()
    assert gate[gate.index("--host") + 1] == "0.0.0.0" and gate[gate.index("--port") + 1] == "9092"
    assert gate[gate.index("--upstream") + 1] == f"https://127.0.0.1:{coord.superlink_port}"
    coord._write_connection()
    conn = tomllib.loads((opts.flwr_home / "config.toml").read_text())["superlink"]["fedembed"]
    assert conn["address"] == f"127.0.0.1:{coord.superlink_port}"
    assert fleet_paths() and all(p.startswith("/v1/fleet/") for p in fleet_paths())
