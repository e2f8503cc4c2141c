"""``fedembed client``: an organisation as a Flower SuperNode and its worker.

:class:`ClientOptions` (the coordinator's address, TLS, keys, state directory),
:func:`node_config` (what the SuperNode hands its ClientApps), :class:`WorkerProcess`
(the long-lived organisation worker), :func:`supernode_command` and :func:`run_client`
(both kept running until interrupted).

With its worker running, the SuperNode starts no process per message and serves no
Runtime API: it hands each message it pulls to the worker over the worker's socket, in its
own message loop, and stores the reply itself (``--worker-socket``,
:mod:`fedembed.deploy.handoff`). Without a worker (it did not come up, or
``--no-worker``) the SuperNode runs as Flower's default, one ``flwr-clientapp`` per
message, each handling it itself or forwarding it to the worker's socket when one
answers there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedembed.config import ConfigError
from fedembed.deploy.processes import (
    _command,
    _die_with_parent,
    _forward_signals,
    flower_env,
    free_port,
    kill_tree,
)

log = logging.getLogger(__name__)

MAX_REFUSED_DELAY = 60.0
"""Seconds, at most, between tries of a node the coordinator refused to activate (the
delay doubles from ``restart_delay``: the fix takes a person, on either side)."""


@dataclass
class ClientOptions:
    """How ``fedembed client`` runs an organisation.

    Parameters
    ----------
    superlink : str
        The coordinator's address, ``host:port``.
    state_dir : Path
        Its own private state directory (head, optimizer state, table cache).
    org : int or None
        This organisation's index in the federation-wide task, written into the node
        config as ``org``; None writes no ``org`` (an organisation identified by its
        roster key and its own ``task_config``).
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
    task_config : dict
        The organisation's own task (node-config keys ``task``, ``data``,
        ``task-options``, ``device``), written into the node config as given (values
        already quoted as node-config values).
    extra_node_config : dict
        More node-config entries (e.g. the ``secure-*`` policy keys).
    worker : bool
        Also run the organisation worker (:mod:`fedembed.worker`), which keeps torch and
        the task loaded and answers the messages the per-message ClientApps forward to
        it; off: every ClientApp does the work itself (as under a stock SuperNode).
    """

    superlink: str
    state_dir: Path
    org: int | None = None
    root_cert: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    runtime_port: int | None = None
    restart: bool = True
    task_config: dict[str, str] = field(default_factory=dict)
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
        if self.auth_key is not None and Path(self.auth_key).resolve() != Path(self.identity_key).resolve():
            try:  # a node key that is another member's identity: this node would answer in that member's name
                other = Identity.load(self.auth_key, self.roster).name
            except IdentityError:
                other = None  # a node key of its own, outside the roster: fine
            if other is not None and other != self.name:
                raise ConfigError(
                    f"--auth-key is the roster key of {other!r} but --identity-key is that of {self.name!r}: this "
                    f"node would answer as {self.name!r}, and the coordinator would refuse {self.name!r}'s own node as "
                    "answering twice; give each organisation its own key for both"
                )
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
    """The ``--node-config`` string: ``[org=<index>] state-dir="<dir>" identity-key="<key>" roster="<roster>"``.

    ``org`` only when ``opts.org`` is set; then ``opts.task_config`` (the organisation's
    own task), then ``opts.extra_node_config``, each entry as given. With
    ``worker_socket``, also ``worker-socket="<path>"``: the ClientApp forwards its message
    to the organisation worker listening there.
    """
    items = {} if opts.org is None else {"org": str(opts.org)}
    items |= {"state-dir": json.dumps(str(opts.state_dir)), "identity-key": json.dumps(str(opts.identity_key)),
              "roster": json.dumps(str(opts.roster)), **opts.task_config, **opts.extra_node_config}
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
        """Start it and wait until it listens; False (logged) if it did not come up.

        Raises
        ------
        ConfigError
            The worker exited with :data:`fedembed.worker.EXIT_TASK_BROKEN`: the
            organisation's own task does not load or breaks its contract.
        """
        from fedembed.worker import EXIT_TASK_BROKEN

        self.proc = subprocess.Popen(self.command(), env=self.env, preexec_fn=_die_with_parent)
        self.starts += 1
        self._last_start = time.monotonic()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.proc.returncode == EXIT_TASK_BROKEN:  # restarting it, or joining without it, cannot help
                    raise ConfigError(f"organisation {self.opts.name}: its task failed its check at start (the "
                                      "worker's error above); fix the task and start again")
                log.warning("organisation %s: its worker exited with %d at start; messages are handled "
                            "in the ClientApp processes", self.opts.name, self.proc.returncode)
                return False
            if self.listening():
                log.info("organisation %s: worker listening on %s", self.opts.name, self.path)
                return True
            time.sleep(0.1)
        log.warning("organisation %s: its worker is not listening after %.0f s", self.opts.name, self.startup_timeout)
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

    def running(self) -> bool:
        """Whether its process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> bool:
        """Start it again if it has exited; whether it is running afterwards.

        A worker that keeps dying soon after its start is restarted ever more slowly
        (1 s, 2 s, ... at most 60 s between starts): False while it waits for its next start.
        """
        if self.running() or self.proc is None:
            return self.proc is not None
        now = time.monotonic()
        if now < self._next_start:
            return False
        lived = now - self._last_start
        self._delay = 1.0 if lived > 60.0 else min(60.0, self._delay * 2)
        self._next_start = now + self._delay
        log.warning("organisation %s: its worker exited with %d; starting it again", self.opts.name, self.proc.returncode)
        return self.start()

    def stop(self) -> None:
        """Stop it (it removes its socket)."""
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None


def supernode_command(
    opts: ClientOptions, runtime_port: int, stock: bool = False, worker_socket: Path | None = None,
    handoff: bool = False,
) -> list[str]:
    """The SuperNode command line for ``opts``.

    By default ``python -m fedembed.deploy.supernode`` (the stock SuperNode with its waits
    shortened, see :mod:`fedembed.deploy.supernode`); ``stock=True`` gives the same arguments
    to Flower's own ``flower-supernode``, which works as well. With ``worker_socket``, the
    node config names the worker's socket (a per-message ClientApp forwards there); with
    ``handoff`` as well, the SuperNode hands every message to that worker itself
    (``--worker-socket``: no ClientApp process, no Runtime API).
    """
    if handoff and (stock or worker_socket is None):
        raise ValueError("handing messages to the worker needs fedembed's SuperNode and the worker's socket")
    head = [_command("flower-supernode")] if stock else [sys.executable, "-m", "fedembed.deploy.supernode"]
    cmd = [*head, "--superlink", opts.superlink, "--node-config", node_config(opts, worker_socket),
           "--port", str(runtime_port)]
    if handoff:
        cmd += ["--worker-socket", str(worker_socket), "--isolation", "process"]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(opts.root_cert).resolve())]
    if opts.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(opts.auth_key).resolve())]
    return cmd


def run_client(opts: ClientOptions, max_restarts: int | None = None, restart_delay: float = 3.0) -> int:
    """``fedembed client``: run the organisation's worker and SuperNode until interrupted.

    The worker (:class:`WorkerProcess`, unless ``opts.worker`` is off) is started first
    and started again whenever it exits. While it runs, the SuperNode hands every message
    to it (see the module docstring; a message that comes while the worker restarts waits
    for it). If the worker cannot be (re)started, the SuperNode is started again in
    Flower's default mode (a ClientApp process per message, handling it itself). A
    SuperNode that exits (coordinator restarted, network gone) is started again after
    ``restart_delay`` seconds, unless ``opts.restart`` is off. Both stop with this process.

    Returns
    -------
    int
        The SuperNode's last exit code (0 on Ctrl-C).
    """
    from fedembed.deploy.supernode import EXIT_NOT_ACTIVATED
    from fedembed.worker import MAX_SOCKET_PATH

    opts.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the org's private state: owner only
    if opts.state_dir.stat().st_mode & 0o077:  # one that was there already keeps no wider mode
        log.warning("organisation %s: its state directory %s was readable by others; made owner-only (0700)",
                    opts.name, opts.state_dir)
        opts.state_dir.chmod(0o700)
    env = flower_env(opts.state_dir / "flwr-home")
    # a SuperNode in Flower's default mode (no worker) launches a ClientApp per message as soon as its
    # SuperExec sees the task: look every 0.1 s instead of every second
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    proc: list[subprocess.Popen | None] = [None]
    port = opts.runtime_port or free_port()
    worker: WorkerProcess | None = None
    if opts.worker:
        worker = WorkerProcess(opts, env)
        if len(os.fsencode(str(worker.path))) > MAX_SOCKET_PATH:
            log.warning("organisation %s: no worker, its socket path %s is too long for a Unix socket (use a "
                        "shorter --state-dir); every message starts torch in its own ClientApp", opts.name, worker.path)
            worker = None
    restarts, refused, code = 0, 0, 0
    with _forward_signals():
        try:
            handoff = worker is not None and worker.start()
            while True:
                cmd = supernode_command(opts, port, worker_socket=None if worker is None else worker.path,
                                        handoff=handoff)
                log.info("organisation %s: %s", opts.name, " ".join(cmd))
                proc[0] = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
                fallback = False
                while (code := proc[0].poll()) is None:
                    if worker is not None and not worker.ensure() and handoff:
                        log.warning("organisation %s: its worker is down; restarting the SuperNode to start a "
                                    "ClientApp process per message meanwhile", opts.name)
                        kill_tree(proc[0])
                        code, fallback, handoff = proc[0].returncode, True, False
                        break
                    time.sleep(0.5)
                proc[0] = None
                if fallback:
                    continue
                # A SuperNode also exits (with 0) when a restarted coordinator no longer knows its
                # node id: starting it again re-activates it with its key.
                refused = refused + 1 if code == EXIT_NOT_ACTIVATED else 0
                delay = min(MAX_REFUSED_DELAY, restart_delay * 2 ** (refused - 1)) if refused else restart_delay
                again = opts.restart and (max_restarts is None or restarts < max_restarts)
                if refused:
                    log.error("organisation %s: the coordinator refused to activate this node (Flower's error 2004): either its key "
                              "(--auth-key %s) is not among the coordinator's (fedembed server --auth-key: ask them "
                              "to add its public key), or a SuperNode with this key is online already (another "
                              "fedembed client with it, or one killed under a minute ago: the coordinator keeps a "
                              "node online 60 s past its last heartbeat)%s", opts.name,
                              opts.auth_key, f"; trying again in {delay:.0f} s" if again else "")
                if not again:
                    return code
                time.sleep(0.5)  # a Ctrl-C that also stopped the SuperNode surfaces here, not as a restart
                restarts += 1
                if not refused:
                    log.warning("organisation %s: SuperNode exited with %d; starting it again in %.0f s",
                                opts.name, code, delay)
                time.sleep(delay)
                handoff = worker is not None and worker.running()
        except KeyboardInterrupt:
            return 0
        finally:
            if proc[0] is not None:
                kill_tree(proc[0])
            if worker is not None:
                worker.stop()
