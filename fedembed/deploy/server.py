"""``fedembed server``: the coordinator as a Flower SuperLink, the Fleet gate and a run.

:class:`ServerOptions` (how to listen, TLS, organisation keys, state directory),
:class:`CoordinatorProcess` (the SuperLink on loopback, the Fleet gate on the public port,
our ``flwr`` calls, following the run), :func:`run_outcome` (did the run complete) and
:func:`run_server` (all of it, until the run ends).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedembed.config import ConfigError, RunConfig
from fedembed.deploy.flowerapp import write_app
from fedembed.deploy.processes import (
    _command,
    _die_with_parent,
    _forward_signals,
    flower_env,
    free_port,
    kill_tree,
    wait_for_port,
)
from fedembed.apps.runfiles import DeployedRunFiles
from fedembed.apps.wakeup import wakeup_dir

log = logging.getLogger(__name__)

CONNECTION = "fedembed"
"""Name of the SuperLink connection written into ``flwr-home/config.toml``."""

SUPEREXEC_POLL_SECONDS = "0.5"
"""How often the coordinator's SuperExec asks for a task to launch (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``,
unless set): the ServerApp, once per run."""


@dataclass
class ServerOptions:
    """How ``fedembed server`` runs the coordinator.

    Parameters
    ----------
    state_dir : Path
        Checkpoints, progress, outputs; restarting with the same directory resumes.
    host, port : str, int
        The public address the organisations connect to: only the Fleet API is served
        there (by the Fleet gate, :mod:`fedembed.deploy.fleetgate`). ``0.0.0.0`` for
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
        How often the run's status is checked while its ServerApp has not written its
        ``done`` event (each check is a ``flwr list`` process, about 0.6 s of CPU).
    superlink_port : int or None
        Port of the SuperLink itself, on 127.0.0.1 only (its Control and Runtime APIs, and
        the Fleet API behind the gate); None picks a free one at start.
    max_reply_bytes : int or None
        The gate's budget of objects per reply (the run's ``--max-message-bytes``).
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
    poll_seconds: float = 15.0
    superlink_port: int | None = None
    max_reply_bytes: int | None = None

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


class CoordinatorProcess:
    """A Flower SuperLink on loopback, the Fleet gate on the public port, our run on them.

    Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs on one port (see
    :mod:`fedembed.deploy.fleetgate`), so the SuperLink listens on ``127.0.0.1:superlink_port``
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
        self.wakeup_dir = wakeup_dir(self.opts.state_dir)  # the gate's and the ServerApp's wake-ups
        self.env = flower_env(self.opts.flwr_home)
        # The SuperLink's SuperExec launches the ServerApp once per run, and keeps asking the
        # SuperLink for a task (a TLS request) at this interval for the whole run: twice a
        # second, unless the user set it.
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_SECONDS)

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
        cmd = [sys.executable, "-m", "fedembed.deploy.fleetgate", "--host", o.host, "--port", str(o.port),
               "--upstream", f"{scheme}://{self.superlink_address}"]
        if not o.insecure:
            cmd += ["--certfile", str(o.certfile), "--keyfile", str(o.keyfile), "--ca-certfile", str(o.ca_certfile)]
        if self.wakeup_dir is not None:
            cmd += ["--wakeup-dir", str(self.wakeup_dir)]
        if o.max_reply_bytes is not None:
            cmd += ["--max-reply-bytes", str(o.max_reply_bytes)]
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
        app = write_app(self.opts.state_dir / "app", cfg, self.opts.state_dir, self.wakeup_dir)
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
        The run (must be the same federation spec as the checkpoints in the state dir, if any).
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
        if ckpt.config.get("run", {}).get("federation") != cfg.to_dict()["federation"]:
            raise ConfigError(
                f"state dir {opts.state_dir} holds a run of another federation spec (other tables); "
                "use a new --state-dir or the same --federation"
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
