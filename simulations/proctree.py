"""A process and its descendants, read from ``/proc``: members, CPU time, memory.

Flower's simulation engine runs the ServerApp in the driver process and each
organisation in Ray worker processes (children of Ray's raylet, itself a child of the
driver), so the work of a round is the CPU time of the whole tree.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def process_tree(pid: int | None = None) -> list[int]:
    """``pid`` (default: this process) and all its descendants alive now."""
    todo, seen = [pid or os.getpid()], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by ``pid``'s tree (processes alive now; Ray's stay up all run)."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


def status_kib(pid: int, field: str, name: str = "status") -> int:
    """A ``kB`` field of ``/proc/<pid>/<name>`` (``status``: VmRSS, VmHWM; ``smaps_rollup``: Pss)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
