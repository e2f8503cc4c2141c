"""Deployment: the coordinator and the organisations as real Flower processes.

``fedembed server`` = :func:`run_server`: starts a Flower SuperLink (TLS and SuperNode
authentication on by default) on 127.0.0.1 only, puts the Fleet gate
(:mod:`fedembed.fleetgate`: the Fleet API and nothing else) on the public host and port,
registers the organisations' public keys, submits the fedembed ServerApp as a Flower run
and follows it, printing progress per round; its own ``flwr`` calls (Control API) go to
the SuperLink's loopback address. The run
is submitted as a minimal Flower App (``state-dir/app/pyproject.toml``: the components
``server.app:app`` / ``client.app:app`` and the run config, no code) so the ServerApp and
the ClientApps import fedembed from the environment the user installed; Flower's run-time
dependency installation (``uv sync``) is switched off on both sides.

``fedembed client`` = :func:`run_client`: runs a Flower SuperNode with the node config
``org=<index> state-dir=<dir>``, restarting it if it exits while the coordinator is away.

Files in the coordinator's state directory::

    coordinator/     checkpoints (resume from the last finished round)
    progress.jsonl   one line per finished round, written by the ServerApp
    metrics.json, embeddings.npz, report.png   when the run is done
    app/             the Flower App submitted
    flwr-home/       Flower's own files (FLWR_HOME of the SuperLink and of `flwr` calls)
    superlink.log    the SuperLink's log
    fleetgate.log    the Fleet gate's log (refused requests, with their peer)
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedembed.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

CONNECTION = "fedembed"
"""Name of the SuperLink connection written into ``flwr-home/config.toml``."""


# ------------------------------------------------------------------ files of a deployed run


class DeployedRunFiles:
    """What the deployed ServerApp writes into the coordinator's state directory.

    Parameters
    ----------
    state_dir : Path
        The coordinator's state directory (run config ``state-dir``).
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.coordinator_dir = self.state_dir / "coordinator"
        self.progress = self.state_dir / "progress.jsonl"
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, doc: dict[str, Any]) -> None:
        with open(self.progress, "a", encoding="utf-8") as f:
            f.write(json.dumps(doc, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_start(self, coordinator: Any) -> None:
        """Record where the ServerApp starts: first round and a digest of its tables."""
        self._append({"event": "start", "round": coordinator.start_round,
                      "tables_sha256": tables_digest(coordinator.tables.tables), "time": time.time()})

    def on_round(self, entry: dict) -> None:
        """Append one finished round (its log entry) to ``progress.jsonl``."""
        self._append({"event": "closing" if entry.get("closing") else "round", **entry, "time": time.time()})

    def on_done(self, coordinator: Any) -> None:
        """Write ``metrics.json``, ``embeddings.npz``, ``report.png``; mark the run done."""
        coordinator.log.write(self.state_dir, coordinator.tables.tables)
        self._append({"event": "done", "rounds": coordinator.cfg.rounds, "time": time.time()})


def tables_digest(tables: dict[str, Any]) -> str:
    """SHA-256 over table names, shapes, dtypes and values (resume checks)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in sorted(tables):
        a = np.ascontiguousarray(tables[name])
        h.update(f"{name}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ------------------------------------------------------------------ processes


def _venv_bin() -> str:
    return str(Path(sys.executable).parent)


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: our interpreter's bin first, no `uv sync`, no update check."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([_venv_bin(), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # A SuperNode's SuperExec looks for a ClientApp task to launch every second by default;
    # secure aggregation is several messages in a row, each waiting on that poll.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    # the ServerApp / ClientApp processes must find fedembed, server, client and user tasks
    paths = [os.getcwd(), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))  # in order, each once
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _command(name: str) -> str:
    path = Path(_venv_bin()) / name
    return str(path) if path.exists() else name


def descendants(pid: int) -> list[int]:
    """All descendant process ids of ``pid`` (Linux ``/proc``), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop ``proc`` and every process it started (SIGTERM, then SIGKILL after ``grace`` s).

    Flower's SuperExec and app processes run in sessions of their own, so the process
    tree, not the process group, is what is walked.
    """
    if proc.poll() is not None:
        return
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {host}:{port} was up")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} not accepting connections after {timeout:.0f} s")


# ------------------------------------------------------------------ coordinator


@dataclass
class ServerOptions:
    """How ``fedembed server`` runs the coordinator.

    Parameters
    ----------
    state_dir : Path
        Checkpoints, progress, outputs; restarting with the same directory resumes.
    host, port : str, int
        The public address the organisations connect to: only the Fleet API is served
        there (by the Fleet gate, :mod:`fedembed.fleetgate`). ``0.0.0.0`` for
        organisations on other machines.
    certfile, keyfile, ca_certfile : Path or None
        TLS server certificate, its key, and the CA that signed it (required unless
        ``insecure``).
    insecure : bool
        Plain HTTP, no SuperNode authentication. For loopback trials only.
    auth_keys : list of Path
        Public keys (OpenSSH ``ecdsa-sha2-nistp*``) of the organisations allowed to join.
        Empty with TLS on: authentication is off (logged as a warning).
    startup_timeout : float
        Seconds to wait for the SuperLink and the Fleet gate to listen.
    poll_seconds : float
        How often the run's status is checked.
    superlink_port : int or None
        Port of the SuperLink itself, on 127.0.0.1 only (its Control and Runtime APIs, and
        the Fleet API behind the gate); None picks a free one at start.
    """

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9092
    certfile: Path | None = None
    keyfile: Path | None = None
    ca_certfile: Path | None = None
    insecure: bool = False
    auth_keys: list[Path] = field(default_factory=list)
    startup_timeout: float = 60.0
    poll_seconds: float = 5.0
    superlink_port: int | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if not self.insecure:
            missing = [n for n, v in (("--certfile", self.certfile), ("--keyfile", self.keyfile),
                                      ("--ca-certfile", self.ca_certfile)) if v is None]
            if missing:
                raise ConfigError(
                    f"TLS is on by default and needs {', '.join(missing)} "
                    "(make test ones with `fedembed certs DIR`), or pass --insecure for a loopback trial"
                )
            for p in (self.certfile, self.keyfile, self.ca_certfile):
                if not Path(p).is_file():
                    raise ConfigError(f"TLS file {p} not found")
            self.certfile, self.keyfile, self.ca_certfile = (
                Path(self.certfile).resolve(), Path(self.keyfile).resolve(), Path(self.ca_certfile).resolve()
            )
        for k in self.auth_keys:
            if not Path(k).is_file():
                raise ConfigError(f"organisation public key {k} not found")
        self.auth_keys = [Path(k).resolve() for k in self.auth_keys]
        if self.insecure and self.auth_keys:
            raise ConfigError("SuperNode authentication needs TLS: drop --insecure or drop --auth-key")
        if self.superlink_port is not None and self.superlink_port == self.port:
            raise ConfigError(f"the SuperLink's loopback port must differ from the public port {self.port}")

    @property
    def connect_host(self) -> str:
        """Address this machine reaches the public (Fleet) port on."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the SuperLink and of the `flwr` calls (never the user's ~/.flwr)."""
        return self.state_dir / "flwr-home"


def write_app(app_dir: Path, cfg: RunConfig, state_dir: Path) -> Path:
    """Write the Flower App that ``flwr run`` submits: components and run config, no code.

    Parameters
    ----------
    app_dir : Path
        Directory to (re)write; gets only ``pyproject.toml``.
    cfg : RunConfig
        The run, stored as JSON under run config key ``fedembed``.
    state_dir : Path
        The coordinator's state directory, run config key ``state-dir``.
    """
    import tomli_w

    app_dir = Path(app_dir)
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    doc = {
        "project": {
            "name": "fedembed-run",
            "version": "1.0.0",
            "description": "fedembed coordinator run (components come from the installed fedembed)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedembed",
                    "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                    "config": {"fedembed": json.dumps(cfg.to_dict()), "state-dir": str(Path(state_dir).resolve())},
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(doc).encode())
    return app_dir


class CoordinatorProcess:
    """A Flower SuperLink on loopback, the Fleet gate on the public port, our run on them.

    Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs on one port (see
    :mod:`fedembed.fleetgate`), so the SuperLink listens on ``127.0.0.1:superlink_port``
    only, where the SuperExec and our own ``flwr`` calls reach it, and the gate on
    ``opts.host:opts.port`` lets through the Fleet API alone.

    Parameters
    ----------
    opts : ServerOptions
        Where and how to listen.
    """

    LOOPBACK = "127.0.0.1"

    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.gate: subprocess.Popen | None = None
        self.superlink_port = opts.superlink_port or free_port(self.LOOPBACK)
        while self.superlink_port == opts.port:  # the public port is not bound yet: never pick it
            self.superlink_port = free_port(self.LOOPBACK)
        self.opts.state_dir.mkdir(parents=True, exist_ok=True)
        self.files = DeployedRunFiles(self.opts.state_dir)
        self.env = flower_env(self.opts.flwr_home)

    @property
    def superlink_address(self) -> str:
        """``127.0.0.1:<port>`` of the SuperLink (Control and Runtime APIs; never public)."""
        return f"{self.LOOPBACK}:{self.superlink_port}"

    # -------------------------------------------------------------- SuperLink
    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line: loopback only."""
        o = self.opts
        cmd = [_command("flower-superlink"), "--host", self.LOOPBACK, "--port", str(self.superlink_port),
               "--disable-runtime-dependency-installation"]
        if o.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-certfile", str(o.certfile), "--ssl-keyfile", str(o.keyfile),
                    "--ssl-ca-certfile", str(o.ca_certfile)]
            if o.auth_keys:
                cmd.append("--enable-supernode-auth")
        return cmd

    def fleetgate_command(self) -> list[str]:
        """The Fleet gate's command line: public ``host:port`` -> the loopback SuperLink."""
        o = self.opts
        scheme = "http" if o.insecure else "https"
        cmd = [sys.executable, "-m", "fedembed.fleetgate", "--host", o.host, "--port", str(o.port),
               "--upstream", f"{scheme}://{self.superlink_address}"]
        if not o.insecure:
            cmd += ["--certfile", str(o.certfile), "--keyfile", str(o.keyfile), "--ca-certfile", str(o.ca_certfile)]
        return cmd

    def _spawn(self, cmd: list[str], logname: str) -> subprocess.Popen:
        log.info("starting %s", " ".join(cmd))
        logfile = open(self.opts.state_dir / logname, "ab")  # noqa: SIM115 - owned by the process
        try:
            return subprocess.Popen(cmd, cwd=self.opts.state_dir, env=self.env, stdout=logfile,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            logfile.close()

    def start(self) -> None:
        """Start the SuperLink (loopback) and the Fleet gate (public); write the `flwr` connection; register org keys."""
        o = self.opts
        if o.insecure:
            log.warning("--insecure: TLS is off and any SuperNode may join; traffic is readable on the network")
        elif not o.auth_keys:
            log.warning("no --auth-key given: SuperNode authentication is off, any SuperNode with the CA may join")
        self._write_connection()
        self.proc = self._spawn(self.superlink_command(), "superlink.log")
        wait_for_port(self.LOOPBACK, self.superlink_port, o.startup_timeout, self.proc)
        self.gate = self._spawn(self.fleetgate_command(), "fleetgate.log")
        wait_for_port(o.connect_host, o.port, o.startup_timeout, self.gate)
        log.info("SuperLink on %s (Control and Runtime APIs, loopback only); Fleet API on %s:%d",
                 self.superlink_address, o.host, o.port)
        for key in o.auth_keys:
            self.register(key)

    def _check_running(self) -> None:
        """Raise if the SuperLink or the gate has exited."""
        for proc, name, logname in ((self.proc, "SuperLink", "superlink.log"),
                                    (self.gate, "Fleet gate", "fleetgate.log")):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.opts.state_dir / logname}")

    def _write_connection(self) -> None:
        import tomli_w

        o = self.opts
        conn: dict[str, Any] = {"address": self.superlink_address}
        if o.insecure:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(o.ca_certfile)
        o.flwr_home.mkdir(parents=True, exist_ok=True)
        doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        (o.flwr_home / "config.toml").write_bytes(tomli_w.dumps(doc).encode())

    def flwr(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run ``flwr <args> fedembed --format json`` against our SuperLink; its JSON answer."""
        cmd = [_command("flwr"), *args, CONNECTION, "--format", "json"]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.opts.state_dir)
        start = res.stdout.find("{")
        try:
            return json.loads(res.stdout[start:]) if start >= 0 else {"success": False, "error-message": res.stderr}
        except json.JSONDecodeError:
            return {"success": False, "error-message": res.stdout + res.stderr}

    def register(self, public_key: Path) -> None:
        """Allow the organisation holding ``public_key``'s private key to join."""
        out = self.flwr("supernode", "register", str(public_key))
        if out.get("success"):
            log.info("registered organisation key %s as node %s", public_key.name, out.get("node-id"))
        elif "already in use" in str(out.get("error-message", "")):
            log.info("organisation key %s already registered", public_key.name)
        else:
            raise RuntimeError(f"could not register organisation key {public_key}: {out.get('error-message')}")

    def online_nodes(self) -> list[str]:
        """Node ids of the SuperNodes connected right now."""
        out = self.flwr("supernode", "list")
        return [str(n.get("node-id")) for n in out.get("nodes") or [] if n.get("status") == "online"]

    def wait_for_orgs(self, count: int, timeout: float, on_change: Callable[[int], None] | None = None) -> int:
        """Wait until ``count`` organisations are online (or ``timeout`` s); how many are."""
        deadline, seen = time.monotonic() + timeout, -1
        while True:
            online = len(self.online_nodes())
            if online != seen:
                seen = online
                if on_change is not None:
                    on_change(online)
            if online >= count or time.monotonic() > deadline:
                return online
            self._check_running()
            time.sleep(1.0)

    # -------------------------------------------------------------- run
    def submit(self, cfg: RunConfig) -> int:
        """Submit the fedembed ServerApp for ``cfg``; returns Flower's run id."""
        app = write_app(self.opts.state_dir / "app", cfg, self.opts.state_dir)
        out = self.flwr("run", str(app))
        if not out.get("success"):
            raise RuntimeError(f"`flwr run` failed: {out.get('error-message')}")
        return int(out["run-id"])

    def run_status(self, run_id: int) -> tuple[str, str]:
        """Flower's status of the run (e.g. ``running``, ``finished:completed``) and details."""
        out = self.flwr("list", "--run-id", str(run_id))
        runs = out.get("runs") or []
        if not runs:
            return "unknown", str(out.get("error-message", ""))
        return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))

    def _read_progress(self, offset: int, on_event: Callable[[dict], None] | None) -> tuple[int, bool]:
        """Pass the complete ``progress.jsonl`` lines after byte ``offset`` to ``on_event``.

        Returns
        -------
        tuple of (int, bool)
            The new offset, and whether one of the lines read was the ``done`` event.
        """
        done = False
        if not self.files.progress.exists():
            return offset, done
        with open(self.files.progress, encoding="utf-8") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith("\n"):
                    break
                offset += len(line.encode())
                event = json.loads(line)
                done = done or event.get("event") == "done"
                if on_event is not None:
                    on_event(event)
        return offset, done

    def follow(
        self, run_id: int, on_event: Callable[[dict], None] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Wait for the run to end, passing each ``progress.jsonl`` line to ``on_event``.

        The ServerApp writes its ``done`` event (after ``metrics.json``) before it returns,
        so once Flower reports the run finished, the progress file is read once more: a
        ``done`` written between the last read and the status check is not missed.

        Returns
        -------
        dict
            ``{"status": ..., "details": ..., "done": bool}``; ``done`` means the ServerApp
            wrote its outputs (see :func:`run_outcome`).
        """
        offset = self.files.progress.stat().st_size if self.files.progress.exists() else 0
        deadline = None if timeout is None else time.monotonic() + timeout
        next_poll, done = 0.0, False

        def result(status: str, details: str) -> dict[str, Any]:
            nonlocal offset, done
            offset, last = self._read_progress(offset, on_event)  # what was written while we looked away
            return {"status": status, "details": details, "done": done or last}

        while True:
            offset, seen = self._read_progress(offset, on_event)
            done = done or seen
            if self.proc is not None and self.proc.poll() is not None:
                return result("superlink-exited", f"SuperLink exited with {self.proc.returncode}")
            if self.gate is not None and self.gate.poll() is not None:
                return result("fleetgate-exited", f"Fleet gate exited with {self.gate.returncode}")
            if time.monotonic() >= next_poll or done:
                status, details = self.run_status(run_id)
                if status.startswith("finished"):
                    return result(status, details)
                next_poll = time.monotonic() + (1.0 if done else self.opts.poll_seconds)
            if deadline is not None and time.monotonic() > deadline:
                return result("timeout", "")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the Fleet gate, then the SuperLink and everything it started."""
        if self.gate is not None:
            kill_tree(self.gate)
            self.gate = None
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None


def run_outcome(result: dict[str, Any]) -> tuple[bool, str]:
    """Did a followed run complete, and if not, why not.

    A run completed when its ServerApp wrote its outputs (the ``done`` event, after
    ``metrics.json``), whatever Flower's status says once the ServerApp has returned
    (it may lag behind, or the SuperLink may be stopped right after).

    Parameters
    ----------
    result : dict
        What :meth:`CoordinatorProcess.follow` returned.

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` for a completed run; ``(False, reason)`` otherwise, the reason
        saying what ended the run.
    """
    status, details = str(result.get("status", "unknown")), str(result.get("details", "") or "")
    if result.get("done"):
        return True, ""
    if status == "finished:completed":
        return False, ("Flower reports the run completed but the ServerApp never wrote its outputs "
                       "(no `done` event in progress.jsonl): see the SuperLink log for its errors")
    if status == "timeout":
        return False, "gave up waiting for the run to end"
    reason = f"run ended with status {status}"
    return False, reason + (f": {details}" if details and details != "N/A" else "")


def resume_round(state_dir: Path) -> int:
    """The last round checkpointed in ``state_dir`` (0: none)."""
    from fedembed.store import load_latest_checkpoint

    ckpt = load_latest_checkpoint(Path(state_dir) / "coordinator")
    return 0 if ckpt is None else ckpt.round


def run_server(
    cfg: RunConfig,
    opts: ServerOptions,
    on_event: Callable[[dict], None] | None = None,
    start_orgs: int = 0,
    start_timeout: float = 600.0,
) -> dict[str, Any]:
    """``fedembed server``: SuperLink + run, until the run ends. Resumes from ``opts.state_dir``.

    Parameters
    ----------
    cfg : RunConfig
        The run (must be the same task as the checkpoints in the state dir, if any).
    opts : ServerOptions
        Listening, TLS, organisation keys, state directory.
    on_event : callable, optional
        Called with each progress event (``round``, ``closing``, ``done``, and
        ``waiting`` with ``online`` while organisations join).
    start_orgs : int
        Submit the run only once this many organisations are online (waiting at most
        ``start_timeout`` s); 0 submits at once and the ServerApp waits for
        ``cfg.min_orgs``.
    start_timeout : float
        See ``start_orgs``.

    Returns
    -------
    dict
        Final status (see :meth:`CoordinatorProcess.follow`).
    """
    from fedembed.store import load_latest_checkpoint

    ckpt = load_latest_checkpoint(opts.state_dir / "coordinator")
    if ckpt is not None:
        if ckpt.config.get("run", {}).get("task") != cfg.to_dict()["task"]:
            raise ConfigError(
                f"state dir {opts.state_dir} holds a run of another task "
                f"({ckpt.config.get('run', {}).get('task')}); use a new --state-dir or the same task"
            )
        log.info("state dir %s holds round %d of %d: continuing from there", opts.state_dir, ckpt.round, cfg.rounds)
    (opts.state_dir).mkdir(parents=True, exist_ok=True)
    (opts.state_dir / "run.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    coord = CoordinatorProcess(opts)
    with _forward_signals(), _stopping(coord):
        coord.start()
        if start_orgs > 0:
            def joined(n: int) -> None:
                if on_event is not None:
                    on_event({"event": "waiting", "online": n, "wanted": start_orgs})

            coord.wait_for_orgs(start_orgs, start_timeout, joined)
        run_id = coord.submit(cfg)
        log.info("submitted run %d; waiting for %s organisation(s)", run_id, cfg.min_orgs)
        return coord.follow(run_id, on_event)


@contextmanager
def _stopping(coord: CoordinatorProcess) -> Iterator[None]:
    try:
        yield
    finally:
        coord.stop()


# ------------------------------------------------------------------ organisation


@dataclass
class ClientOptions:
    """How ``fedembed client`` runs an organisation.

    Parameters
    ----------
    superlink : str
        The coordinator's address, ``host:port``.
    org : int
        This organisation's index in the task.
    state_dir : Path
        Its own private state directory (head, optimizer state, table cache).
    root_cert : Path or None
        CA certificate that signed the coordinator's certificate (TLS).
    auth_key : Path or None
        This organisation's private key (OpenSSH EC); its public key must be listed by
        the coordinator.
    insecure : bool
        Plain HTTP (only against an ``--insecure`` coordinator).
    runtime_port : int or None
        Port of the SuperNode's local Runtime API (127.0.0.1); None picks a free one,
        so several organisations can run on one machine.
    restart : bool
        Start the SuperNode again whenever it exits (coordinator restarted or away).
    identity_key : Path or None
        This organisation's private identity key (signs every reply and its secure
        aggregation messages); default ``auth_key``.
    roster : Path or None
        The federation's roster as this organisation holds it (directory of ``<name>.pub``
        or JSON): the keys it checks the others' signatures with.
    extra_node_config : dict
        More node-config entries (e.g. the ``secure-*`` policy keys).
    worker : bool
        Also run the organisation worker (:mod:`fedembed.worker`), which keeps torch and
        the task loaded and answers the messages the per-message ClientApps forward to
        it; off: every ClientApp does the work itself (as under a stock SuperNode).
    """

    superlink: str
    org: int
    state_dir: Path
    root_cert: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    runtime_port: int | None = None
    restart: bool = True
    extra_node_config: dict[str, str] = field(default_factory=dict)
    identity_key: Path | None = None
    roster: Path | None = None
    worker: bool = True

    def __post_init__(self) -> None:
        from fedembed.identity import Identity, IdentityError

        self.state_dir = Path(self.state_dir).resolve()
        self.identity_key = self.identity_key or self.auth_key
        if self.identity_key is None or self.roster is None:
            raise ConfigError(
                "an organisation needs its identity key (--identity-key, default --auth-key) and the federation's "
                "roster (--roster: directory of <name>.pub files or JSON)"
            )
        try:
            self.name = Identity.load(self.identity_key, self.roster).name
        except IdentityError as exc:
            raise ConfigError(str(exc)) from exc
        self.identity_key, self.roster = Path(self.identity_key).resolve(), Path(self.roster).resolve()
        if self.insecure:
            if self.auth_key is not None:
                raise ConfigError("--auth-key needs TLS: drop --insecure")
        elif self.root_cert is None:
            raise ConfigError("TLS is on by default: pass --root-cert CA.crt (or --insecure for a loopback trial)")
        for p in (self.root_cert, self.auth_key):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"{p} not found")


def node_config(opts: ClientOptions, worker_socket: Path | None = None) -> str:
    """The ``--node-config`` string: ``org=<index> state-dir="<dir>" identity-key="<key>" roster="<roster>"`` (+ extras).

    With ``worker_socket``, also ``worker-socket="<path>"``: the ClientApp forwards its
    message to the organisation worker listening there.
    """
    items = {"org": str(opts.org), "state-dir": json.dumps(str(opts.state_dir)),
             "identity-key": json.dumps(str(opts.identity_key)), "roster": json.dumps(str(opts.roster)),
             **opts.extra_node_config}
    if worker_socket is not None:
        items["worker-socket"] = json.dumps(str(worker_socket))
    return " ".join(f"{k}={v}" for k, v in items.items())


class WorkerProcess:
    """The organisation worker (``python -m fedembed.worker``) that ``fedembed client`` keeps running.

    Parameters
    ----------
    opts : ClientOptions
        The organisation; the worker gets the same node config as its SuperNode.
    env : dict
        The environment to start it in.
    startup_timeout : float
        Seconds to wait for it to listen (it imports torch first).
    """

    def __init__(self, opts: ClientOptions, env: dict[str, str], startup_timeout: float = 120.0) -> None:
        from fedembed.worker import socket_path

        self.opts, self.env, self.startup_timeout = opts, env, startup_timeout
        self.path = socket_path(opts.state_dir)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._last_start, self._next_start, self._delay = 0.0, 0.0, 0.5

    def command(self) -> list[str]:
        """Its command line."""
        return [sys.executable, "-m", "fedembed.worker", "--socket", str(self.path), "--node-config", node_config(self.opts)]

    def start(self) -> bool:
        """Start it and wait until it listens; False (logged) if it did not come up."""
        self.proc = subprocess.Popen(self.command(), env=self.env, preexec_fn=_die_with_parent)
        self.starts += 1
        self._last_start = time.monotonic()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log.warning("organisation %d: its worker exited with %d at start; messages are handled "
                            "in the ClientApp processes", self.opts.org, self.proc.returncode)
                return False
            if self.listening():
                log.info("organisation %d: worker listening on %s", self.opts.org, self.path)
                return True
            time.sleep(0.1)
        log.warning("organisation %d: its worker is not listening after %.0f s", self.opts.org, self.startup_timeout)
        return False

    def listening(self) -> bool:
        """Whether a worker accepts connections on the socket."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(str(self.path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def ensure(self) -> None:
        """Start it again if it has exited (meanwhile the ClientApps handle messages themselves).

        A worker that keeps dying soon after its start is restarted ever more slowly
        (1 s, 2 s, ... at most 60 s between starts).
        """
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if now < self._next_start:
            return
        lived = now - self._last_start
        self._delay = 1.0 if lived > 60.0 else min(60.0, self._delay * 2)
        self._next_start = now + self._delay
        log.warning("organisation %d: its worker exited with %d; starting it again", self.opts.org, self.proc.returncode)
        self.start()

    def stop(self) -> None:
        """Stop it (it removes its socket)."""
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None


def supernode_command(
    opts: ClientOptions, runtime_port: int, stock: bool = False, worker_socket: Path | None = None
) -> list[str]:
    """The SuperNode command line for ``opts``.

    By default ``python -m fedembed.supernode`` (the stock SuperNode with a shorter idle
    poll, see :mod:`fedembed.supernode`); ``stock=True`` gives the same arguments to
    Flower's own ``flower-supernode``, which works as well.
    """
    head = [_command("flower-supernode")] if stock else [sys.executable, "-m", "fedembed.supernode"]
    cmd = [*head, "--superlink", opts.superlink, "--node-config", node_config(opts, worker_socket),
           "--port", str(runtime_port)]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(opts.root_cert).resolve())]
    if opts.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(opts.auth_key).resolve())]
    return cmd


@contextmanager
def _forward_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so ``finally`` blocks stop child processes.

    SIGINT is set explicitly: a process started in the background by a script inherits
    it ignored, and Python then never raises KeyboardInterrupt.
    """

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_client(opts: ClientOptions, max_restarts: int | None = None, restart_delay: float = 3.0) -> int:
    """``fedembed client``: run the organisation's worker and SuperNode until interrupted.

    The worker (:class:`WorkerProcess`, unless ``opts.worker`` is off) is started first
    and started again whenever it exits; the SuperNode's ClientApps forward their
    messages to it. A SuperNode that exits (coordinator restarted, network gone) is
    started again after ``restart_delay`` seconds, unless ``opts.restart`` is off. Both
    stop with this process.

    Returns
    -------
    int
        The SuperNode's last exit code (0 on Ctrl-C).
    """
    from fedembed.worker import MAX_SOCKET_PATH

    opts.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the org's private state: owner only
    env = flower_env(opts.state_dir / "flwr-home")
    proc: list[subprocess.Popen | None] = [None]
    worker: WorkerProcess | None = None
    if opts.worker:
        worker = WorkerProcess(opts, env)
        if len(os.fsencode(str(worker.path))) > MAX_SOCKET_PATH:
            log.warning("organisation %d: no worker, its socket path %s is too long for a Unix socket (use a "
                        "shorter --state-dir); every message starts torch in its own ClientApp", opts.org, worker.path)
            worker = None
    restarts, code = 0, 0
    with _forward_signals():
        try:
            if worker is not None:
                worker.start()
            while True:
                port = opts.runtime_port or free_port()
                cmd = supernode_command(opts, port, worker_socket=None if worker is None else worker.path)
                log.info("organisation %d: %s", opts.org, " ".join(cmd))
                proc[0] = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
                while (code := proc[0].poll()) is None:
                    if worker is not None:
                        worker.ensure()
                    time.sleep(0.5)
                proc[0] = None
                # A SuperNode also exits (with 0) when a restarted coordinator no longer knows its
                # node id: starting it again re-activates it with its key.
                if not opts.restart or (max_restarts is not None and restarts >= max_restarts):
                    return code
                time.sleep(0.5)  # a Ctrl-C that also stopped the SuperNode surfaces here, not as a restart
                restarts += 1
                log.warning("organisation %d: SuperNode exited with %d; starting it again in %.0f s",
                            opts.org, code, restart_delay)
                time.sleep(restart_delay)
        except KeyboardInterrupt:
            return 0
        finally:
            if proc[0] is not None:
                kill_tree(proc[0])
            if worker is not None:
                worker.stop()
