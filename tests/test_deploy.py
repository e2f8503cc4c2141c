"""The coordinator and the organisations as real processes on loopback.

Every test starts real ``fedembed server`` (Flower SuperLink + ServerApp), ``fedembed
client`` / stock ``flower-supernode`` (Flower SuperNode + ClientApp) processes on free
ports, with real TLS certificates and SuperNode authentication keys from
``fedembed certs``, on a small synthetic task. Each process runs in its own session and
a finalizer SIGKILLs its whole process tree, whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedembed.certs import write_test_certs
from fedembed.deploy.supernode import EXIT_NOT_ACTIVATED
from fedembed.deploy import (
    ClientOptions, descendants, flower_env, free_port, supernode_command, tables_digest, wait_for_port,
)
from fedembed.store import load_checkpoint
from fedembed.tables import init_table
from fedembed.task import TaskSpec, parse_options, task_node_config
from wiretap import RecordingProxy, find_in_capture, value_windows

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# every organisation's own task (each adds its org and orgs); the coordinator gets only the
# federation spec `fedembed spec` writes from it, and the run options
TASK = ["--task", "synthetic", "--option", "rows=2000", "--option", "dim=8", "--option", "examples=300"]
RUN = ["--batch-size", "64"]


# ------------------------------------------------------------------ process handling


class Procs:
    """Processes of one scenario; every one is SIGKILLed with its whole tree at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = flower_env(root / "flwr-home")
        self.env["HOME"] = str(root / "home")  # never the user's ~/.flwr
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")])

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL ``proc`` and all its descendants at once (a crash, not a shutdown)."""
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            else:  # its children may live on in their own sessions
                for pid in descendants(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    c = write_test_certs(tmp_path_factory.mktemp("certs"), orgs=4)
    # the federation's roster: organisations 0-2 (key 3 belongs to an outsider)
    c.roster = tmp_path_factory.mktemp("roster")
    for k in range(3):
        shutil.copy(c.org_public_keys[k], c.roster / c.org_public_keys[k].name)
    return c


def org_task(org: int, orgs: int, task: list[str] = TASK) -> list[str]:
    """Organisation ``org``'s own task options (a built-in task takes its org and orgs)."""
    return [*task, "--option", f"org={org}", "--option", f"orgs={orgs}"]


def write_federation(procs: Procs, orgs: int, task: list[str] = TASK) -> Path:
    """``fedembed spec`` of organisation 0's task: the federation spec the coordinator is started with."""
    out = procs.root / "federation.json"
    res = subprocess.run([str(BIN / "fedembed"), "spec", *org_task(0, orgs, task), "--out", str(out)], cwd=ROOT,
                         env=procs.env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def server_cmd(state: Path, port: int, certs, rounds: int, min_orgs: int, timeout: float, keys: list[int],
               federation: Path, insecure: bool = False, extra: list[str] = []) -> list[str]:
    # no --quiet: it now also hides the server's INFO lines, which the tests wait on ("registered organisation key")
    cmd = [str(BIN / "fedembed"), "server", "--federation", str(federation), *RUN, "--rounds", str(rounds),
           "--min-orgs", str(min_orgs), "--start-orgs", "3", "--round-timeout", str(timeout), "--state-dir", str(state),
           "--port", str(port), *extra]
    if insecure:
        return cmd + ["--insecure", "--roster", str(certs.roster)]
    cmd += ["--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key), "--ca-certfile", str(certs.ca_cert)]
    for k in keys:
        cmd += ["--auth-key", str(certs.org_public_keys[k])]
    return cmd


def client_cmd(org: int, port: int, state: Path, certs, key: int | None = None, orgs: int = 3,
               task: list[str] = TASK) -> list[str]:
    key = org if key is None else key
    return [str(BIN / "fedembed"), "client", "--superlink", f"127.0.0.1:{port}", *org_task(org, orgs, task),
            "--state-dir", str(state), "--root-cert", str(certs.ca_cert), "--auth-key", str(certs.org_private_keys[key]),
            "--roster", str(certs.roster)]


def stock_task_config(org: int, orgs: int) -> dict[str, str]:
    """The node-config entries naming organisation ``org``'s task, as `fedembed client` writes them."""
    args = org_task(org, orgs)
    options = parse_options([value for flag, value in zip(args, args[1:]) if flag == "--option"])
    return task_node_config(TaskSpec(args[args.index("--task") + 1], options))


def events(state: Path) -> list[dict]:
    p = state / "progress.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def wait_until(what: str, predicate, timeout: float, procs: Procs, server: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        if server is not None and server.poll() is not None:
            pytest.fail(f"server exited ({server.returncode}) while waiting for {what}:\n{procs.log(server.name)[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; server log:\n"
                f"{procs.log(server.name)[-3000:] if server is not None else ''}")


def messages_received(procs: Procs, name: str) -> int:
    """How many coordinator messages the SuperNode of process ``name`` has logged receiving."""
    return procs.log(name).count("Receiving: ")


CLIENTAPP_STARTED = "Start `flwr-clientapp` process"
"""What every per-message ``flwr-clientapp`` process logs first."""


def rounds_done(state: Path) -> list[dict]:
    return [e for e in events(state) if e.get("event") == "round"]


# ------------------------------------------------------------------ 1 coordinator + 3 orgs over TLS


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("tls")
    procs = Procs(root)
    try:
        port = free_port()
        state = root / "coordinator"
        t0 = time.monotonic()
        # with secure aggregation: its SecAgg+ stages run over the deployment too, with the pooled normaliser's
        # uploads (twice as wide) through both kinds of organisation
        federation = write_federation(procs, 3)
        server = procs.start("server", server_cmd(state, port, certs, rounds=2, min_orgs=3, timeout=180, keys=[0, 1, 2],
                                                  federation=federation, extra=["--secure", "--pooled-normaliser"]))
        for org in (0, 1):
            procs.start(f"org{org}", client_cmd(org, port, root / f"org{org}", certs))
        # org 2 runs the stock flower-supernode with the node config `fedembed client` would give it;
        # unlike `fedembed client` it gives up if its key is not registered yet, so it starts after that
        wait_until("org keys registered", lambda: "registered organisation key org-2.pub" in procs.log("server"),
                   120, procs, server)
        stock = ClientOptions(superlink=f"127.0.0.1:{port}", state_dir=root / "org2", root_cert=certs.ca_cert,
                              auth_key=certs.org_private_keys[2], roster=certs.roster, task_config=stock_task_config(2, 3))
        procs.start("org2", supernode_command(stock, free_port(), stock=True))
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            peer = tls.getpeercert()
        wait_until("round 1", lambda: rounds_done(state), 240, procs, server)
        # an organisation whose key is not listed tries to join while the run is going, with `fedembed client`
        # (which would try again ever more slowly without --no-restart) and its own idea of the roster
        intruder = client_cmd(0, port, root / "intruder", certs, key=3)
        intruder[intruder.index("--roster") + 1] = str(certs.org_public_keys[3].parent)
        bad = procs.start("intruder", [*intruder, "--no-restart"])
        server.wait(timeout=300)
        bad_code = bad.wait(timeout=60)
        return {"root": root, "state": state, "server_code": server.returncode, "procs": procs, "peer": peer,
                "intruder_code": bad_code, "intruder_key": certs.org_private_keys[3], "seconds": time.monotonic() - t0}
    finally:
        procs.kill_all()


def test_three_orgs_over_tls_complete_two_rounds(tls_run):
    run = tls_run
    assert run["server_code"] == 0, run["procs"].log("server")[-3000:]
    assert ("DNS", "localhost") in run["peer"]["subjectAltName"]  # TLS with our CA's server certificate
    assert "Uvicorn running on https://" in (run["state"] / "superlink.log").read_text()
    doc = json.loads((run["state"] / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert r["clients"] == 3 and r["rejected"] == {}
        assert 0 < r["upload_bytes"] < r["dense_upload_bytes"]
    assert len([k for k in doc["final"] if k != "mean"]) == 3
    with np.load(run["state"] / "embeddings.npz") as z:
        assert z.files and all(z[k].shape == (2000, 8) for k in z.files)
    assert (run["state"] / "report.png").stat().st_size > 0
    for org in range(3):  # each head stayed in its organisation's own state directory
        assert (run["root"] / f"org{org}" / "head.pt").exists()


def test_secure_aggregation_runs_between_processes(tls_run):
    doc = json.loads((tls_run["state"] / "metrics.json").read_text())
    assert doc["config"]["secure"] is True and doc["config"]["train"]["pooled_normaliser"] is True
    first, second = doc["rounds"]
    # round 1 starts its own session; round 2's was set up during round 1 and unmasks early: one round trip, the
    # train reply carrying the masked update and the seed shares (the whole roster took part, nobody dropped)
    assert {"train", "share", "indicators", "unmask_indicators", "masked", "unmask"} <= set(first["stages"])
    assert set(second["stages"]) - {"aggregate"} == {"train"} and second["secure"]["set_up_ahead"]
    assert second["secure"]["early_unmask"]
    for r in doc["rounds"]:
        assert r["clients"] == 3 and r["rows_changed"] > 0


def test_stock_flower_supernode_with_the_same_node_config_joins(tls_run):
    doc = json.loads((tls_run["state"] / "metrics.json").read_text())
    assert all(r["clients"] == 3 for r in doc["rounds"])
    assert (tls_run["root"] / "org2" / "head.pt").exists()  # org 2 ran on the stock flower-supernode
    assert "flower-supernode" in tls_run["procs"].log("org2") or (tls_run["root"] / "org2" / "tables.npz").exists()


def test_fedembed_client_orgs_answer_in_their_worker_without_a_process_per_message(tls_run):
    for org in (0, 1):  # `fedembed client`: the SuperNode hands every message to the worker itself
        assert (tls_run["root"] / f"org{org}" / "worker").is_dir()
        log = tls_run["procs"].log(f"org{org}")
        assert "--worker-socket" in log and "--isolation process" in log
        assert messages_received(tls_run["procs"], f"org{org}") >= 8  # 6 in round 1, 1 in round 2, the evaluation
        assert CLIENTAPP_STARTED not in log  # not one flwr-clientapp process was started
        assert "in this process" not in log and "worker is down" not in log  # never fell back
        assert "no Runtime API" in log and "Uvicorn running" not in log  # nothing else could claim a message
    # stock flower-supernode: no worker, a flwr-clientapp per message doing the work itself, still works
    assert not (tls_run["root"] / "org2" / "worker").exists()
    assert tls_run["procs"].log("org2").count(CLIENTAPP_STARTED) >= 8


def test_unlisted_org_key_is_refused(tls_run):
    assert tls_run["intruder_code"] == EXIT_NOT_ACTIVATED  # told apart from a coordinator out of reach (exit 1)
    log = tls_run["procs"].log("intruder")
    # what to check, naming the key, where Flower said "Failed to activate SuperNode" and no more
    assert (f"the coordinator refused to activate this node (Flower's error 2004): either its key (--auth-key "
            f"{tls_run['intruder_key']}) is not among the coordinator's") in log
    assert "trying again" not in log  # --no-restart: it stops
    assert "No SuperNode found with the given public key" in (tls_run["state"] / "superlink.log").read_text()
    assert not (tls_run["root"] / "intruder" / "head.pt").exists()  # it never got a message
    doc = json.loads((tls_run["state"] / "metrics.json").read_text())
    assert all(r["clients"] == 3 and not r["rejected"] for r in doc["rounds"])


# ------------------------------------------------------------------ faults: an org dies, the coordinator dies


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("faults")
    procs = Procs(root)
    try:
        port = free_port()
        state = root / "coordinator"
        t0 = time.monotonic()
        # more rounds than the run will reach: how many pass before org 2 is back depends on
        # the machine's speed; the restarted coordinator is told where to stop instead
        cmd = server_cmd(state, port, certs, rounds=40, min_orgs=2, timeout=40, keys=[0, 1, 2],
                         federation=write_federation(procs, 3))
        server = procs.start("server", cmd)
        clients = {org: procs.start(f"org{org}", client_cmd(org, port, root / f"org{org}", certs)) for org in range(3)}
        wait_until("round 1", lambda: rounds_done(state), 240, procs, server)

        # org 2 is killed once it has received round 2's message, and started again at once. Flower
        # takes the dead node for online until it misses 2 heartbeats (60 s) and refuses a second
        # activation with the same key until then: `fedembed client` keeps trying.
        # Its worker answers a few tenths of a second after its SuperNode logs the message, so
        # org 2 is killed as soon as a new one is logged: in round 2, or a later one when the
        # rounds (a few tenths of a second each) went on before the poll saw it; the round it
        # was killed in is the one in progress then (the round waits for org 2 until the round
        # timeout).
        before = messages_received(procs, "org2")
        deadline = time.monotonic() + 120
        while messages_received(procs, "org2") == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() < deadline, "org 2 never received a message for round 2"
        procs.kill(clients[2])
        killed_in = len(rounds_done(state)) + 1
        clients[2] = procs.start("org2-again", client_cmd(2, port, root / "org2", certs))
        rejoined = wait_until("org 2 back in a round",
                              lambda: [e["round"] for e in rounds_done(state) if e["round"] > killed_in and e["clients"] == 3],
                              300, procs, server)[0]

        # the coordinator dies in the next round and is started again with the same state dir,
        # to finish the interrupted round and one more
        procs.kill(server)
        last = len(rounds_done(state))
        assert last >= rejoined
        ckpt = load_checkpoint(state / "coordinator" / f"checkpoint-{last:06d}.npz")
        cmd[cmd.index("--rounds") + 1] = str(last + 2)
        server2 = procs.start("server-again", cmd)
        server2.wait(timeout=400)
        return {"root": root, "state": state, "server_code": server2.returncode, "procs": procs,
                "killed_in_round": killed_in, "rejoined_in_round": rejoined, "ckpt": ckpt, "last": last,
                "seconds": time.monotonic() - t0}
    finally:
        procs.kill_all()


def test_org_killed_mid_round_is_left_out_and_rejoins(fault_run):
    run = fault_run
    assert run["server_code"] == 0, run["procs"].log("server-again")[-3000:]
    k = run["killed_in_round"]
    assert k >= 2  # the round in progress when its message came (rounds of a few tenths of a second: not always 2 or 3)
    doc = json.loads((run["state"] / "metrics.json").read_text())
    by_round = {r["round"]: r for r in doc["rounds"]}
    assert by_round[k]["clients"] == 2  # the round finished without it
    assert list(by_round[k]["rejected"]) == ["org-2"] and "no reply" in by_round[k]["rejected"]["org-2"]
    assert by_round[k]["rows_changed"] > 0  # and the others' updates were applied
    r = run["rejoined_in_round"]  # it rejoined, synced and trained again
    assert by_round[r]["clients"] == 3 and not by_round[r]["rejected"]
    assert (run["root"] / "org2" / "tables.json").exists()
    assert json.loads((run["root"] / "org2" / "tables.json").read_text())["version"] >= r - 1


def test_coordinator_killed_and_restarted_continues(fault_run):
    run = fault_run
    last = run["last"]
    assert run["server_code"] == 0, run["procs"].log("server-again")[-3000:]
    assert f"resuming after round {last}" in run["procs"].log("server-again")
    doc = json.loads((run["state"] / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == list(range(1, last + 3))
    assert doc["rounds"][-1]["clients"] == 3  # all organisations came back to the new coordinator
    live = [e["round"] for e in events(run["state"]) if e.get("event") == "round"]
    assert live == list(range(1, last + 3))  # the interrupted round ran once, after the restart
    # the resumed ServerApp started from the last checkpoint's tables, bit for bit
    starts = [e for e in events(run["state"]) if e.get("event") == "start"]
    assert [e["round"] for e in starts] == [1, last + 1]
    assert starts[1]["tables_sha256"] == tables_digest(run["ckpt"].tables.tables)
    assert run["ckpt"].tables.version == last and any((v > 0).any() for v in run["ckpt"].tables.versions.values())
    # and rows the later rounds did not touch are still those of the checkpoint
    final = load_checkpoint(run["state"] / "coordinator" / f"checkpoint-{last + 2:06d}.npz")
    for name, table in final.tables.tables.items():
        untouched = final.tables.versions[name] <= last
        np.testing.assert_array_equal(table[untouched], run["ckpt"].tables.tables[name][untouched])


# ------------------------------------------------------------------ what an observer of an insecure run sees


CLICKS = ["--task", "examples.my_task:ClicksTask", "--option", "products=2000"]


@pytest.fixture(scope="module")
def captured_run(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("capture")
    procs = Procs(root)
    proxy = None
    try:
        port = free_port()
        state = root / "coordinator"
        server = procs.start("server", server_cmd(state, port, certs, rounds=2, min_orgs=3, timeout=180, keys=[],
                                                  federation=write_federation(procs, 3, CLICKS), insecure=True))
        wait_for_port("127.0.0.1", port, 60, server)
        proxy = RecordingProxy(("127.0.0.1", port), root / "capture").start()
        for org in range(3):
            procs.start(f"org{org}", [str(BIN / "fedembed"), "client", "--insecure", "--superlink",
                                      f"127.0.0.1:{proxy.port}", *org_task(org, 3, CLICKS),
                                      "--state-dir", str(root / f"org{org}"),
                                      "--identity-key", str(certs.org_private_keys[org]), "--roster", str(certs.roster)])
        server.wait(timeout=400)
        time.sleep(1.0)
        return {"root": root, "state": state, "server_code": server.returncode, "procs": procs,
                "capture": proxy.capture(), "connections": proxy.connections}
    finally:
        if proxy is not None:
            proxy.close()
        procs.kill_all()


def test_insecure_run_traffic_holds_no_head_parameter(captured_run):
    run = captured_run
    assert run["server_code"] == 0, run["procs"].log("server")[-3000:]
    wire = run["capture"]["up"] + run["capture"]["down"]
    assert run["connections"] >= 3 and len(wire) > 10_000
    heads = sorted(run["root"].glob("org*/head.pt"))
    assert len(heads) == 3
    for path in heads:
        head = {k: v.numpy() for k, v in torch.load(path, weights_only=True)["head"].items()}
        # every run of 4 consecutive values of every parameter, as float32, float16 and float64
        assert head and not find_in_capture(wire, head, count=None), f"{path.parent.name}'s head is in the traffic"


def test_the_capture_search_finds_what_was_sent(captured_run):
    """Control: the capture is plaintext and the same search finds synced table rows and metric names."""
    run = captured_run
    up, down = run["capture"]["up"], run["capture"]["down"]
    assert b"val_score" in up  # metrics travel up in clear in insecure mode
    with np.load(run["state"] / "embeddings.npz") as z:
        final = z["products"]
    init = init_table("products", final.shape, 0, 0.1)
    changed = np.flatnonzero(np.any(final != init, axis=1))
    assert changed.size > 0
    # the closing evaluation synced the final value of every changed row down to every org
    rows = final[changed[:: max(1, changed.size // 8)]]
    found = sum(w.astype(np.float32).tobytes() in down for row in rows for w in value_windows(row))
    total = sum(1 for row in rows for _ in value_windows(row))
    assert found == total
