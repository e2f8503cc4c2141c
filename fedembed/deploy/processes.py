"""Process plumbing shared by the coordinator and the organisations.

The environment Flower's processes run in (:func:`flower_env`), where their commands are
found, children that die with their parent, stopping a whole process tree
(:func:`kill_tree`), free and listening TCP ports, and signals turned into
``KeyboardInterrupt`` so ``finally`` blocks stop the children.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _venv_bin() -> str:
    return str(Path(sys.executable).parent)


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: our interpreter's bin first, no `uv sync`, no update check."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([_venv_bin(), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # torch's OpenMP threads spin between parallel regions by default. An organisation's
    # worker shares its cores with its SuperNode (and, on a test machine, with the other
    # organisations): spinning threads then starve each other, and a local fit measured
    # 10-25x slower with three organisations on two cores. Idle threads sleep instead.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
