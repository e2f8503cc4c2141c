"""Benchmark: a deployed round against a simulated one, same workload, one invocation.

For each aggregation (``plain``, secure ``union``, secure ``dense``) the same run is done
twice: with ``fedembed simulate`` (Flower's simulation engine, one process) and as a real
loopback deployment (``fedembed certs``, ``fedembed server`` with TLS and SuperNode
authentication, ``--orgs`` x ``fedembed client``, every one a process of its own, each
organisation with its long-lived worker, to which its SuperNode hands every message, unless
``--no-worker``: then a ``flwr-clientapp`` process per message). Per run it reports the
seconds per round (``wall_seconds`` of each round in ``metrics.json``, the first
``--warmup`` rounds left out), the round trips per round (the message stages a round is
made of), and each stage's seconds (``rounds[i].stages``); it prints a table and writes
``<out>/deploy_bench.json``, with the targets of issue 11 met or not.

Usage::

    .venv/bin/python simulations/deploy_bench.py --rows 20000 --dim 16 --orgs 3 --rounds 3 --out runs/deploy_bench

The coordinator is started with the federation spec ``fedembed spec`` writes from
organisation 0's task; every organisation names its own task (``--option org=I``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedembed.deploy import flower_env, free_port, kill_tree  # noqa: E402

log = logging.getLogger("fedembed.deploy_bench")

MODES = {"plain": [], "union": ["--secure", "--row-set", "union"], "dense": ["--secure", "--row-set", "dense"]}


def _fedembed() -> list[str]:
    exe = Path(sys.executable).parent / "fedembed"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedembed.cli"]


def task_args(a: argparse.Namespace) -> list[str]:
    """Every organisation's task (the simulation adds org and orgs itself; see :func:`org_task_args`)."""
    return ["--task", "synthetic", "--option", f"rows={a.rows}", "--option", f"dim={a.dim}"]


def org_task_args(a: argparse.Namespace, org: int) -> list[str]:
    """Deployed organisation ``org``'s own task: the simulated one's, with its org and orgs."""
    return [*task_args(a), "--option", f"org={org}", "--option", f"orgs={a.orgs}"]


def run_args(a: argparse.Namespace) -> list[str]:
    """The run options both the simulation and the coordinator get."""
    return ["--rounds", str(a.rounds), "--seed", "0", *(["--guard"] if a.guard else [])]


def _env(root: Path) -> dict[str, str]:
    env = flower_env(root / "flwr-home")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["HOME"] = str(root / "home")  # never the user's ~/.flwr
    return env


def summarise(metrics: dict[str, Any], warmup: int, seconds: float) -> dict[str, Any]:
    """Seconds per round, round trips per round and per-stage seconds of a ``metrics.json``, after ``warmup`` rounds."""
    rounds = [r for r in metrics["rounds"] if r["round"] > warmup]
    if not rounds:
        raise ValueError(f"no round after the {warmup} warm-up round(s): run more --rounds")
    stages: dict[str, float] = {}
    for r in rounds:
        for name, st in r.get("stages", {}).items():
            stages[name] = stages.get(name, 0.0) + float(st.get("seconds", 0.0)) / len(rounds)
    trips = [len([s for s in r.get("stages", {}) if s != "aggregate"]) for r in rounds]
    return {
        "s_per_round": sum(float(r["wall_seconds"]) for r in rounds) / len(rounds),
        "round_trips": max(trips),
        "stages": stages,
        "rounds_measured": [r["round"] for r in rounds],
        "clients": [r.get("clients") for r in rounds],
        "process_seconds": seconds,
    }


def run_simulated(a: argparse.Namespace, mode: str, root: Path) -> dict[str, Any]:
    """``fedembed simulate`` of the workload; its summary."""
    out = root / f"sim-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*_fedembed(), "simulate", *task_args(a), "--orgs", str(a.orgs), *run_args(a), *MODES[mode],
           "--out", str(out), "--quiet"]
    log.info("simulate %s: %s", mode, " ".join(cmd))
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=_env(root), cwd=ROOT, capture_output=True, text=True, timeout=a.timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"fedembed simulate ({mode}) failed with {res.returncode}:\n{res.stderr[-3000:]}")
    return summarise(json.loads((out / "metrics.json").read_text()), a.warmup, time.monotonic() - t0)


def run_deployed(a: argparse.Namespace, mode: str, root: Path, certs: Path) -> dict[str, Any]:
    """The workload as ``fedembed server`` + ``--orgs`` x ``fedembed client`` over TLS on loopback; its summary."""
    base = root / f"deploy-{mode}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    env, port = _env(base), free_port()
    # the coordinator knows only the federation spec, written from organisation 0's task
    federation = base / "federation.json"
    res = subprocess.run([*_fedembed(), "spec", *org_task_args(a, 0), "--out", str(federation)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=a.timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"fedembed spec failed with {res.returncode}:\n{res.stderr[-3000:]}")
    server_cmd = [*_fedembed(), "server", "--federation", str(federation), *run_args(a), *MODES[mode],
                  "--min-orgs", str(a.orgs),
                  "--start-orgs", str(a.orgs), "--state-dir", str(base / "server"), "--port", str(port), "--quiet",
                  "--certfile", str(certs / "server.crt"), "--keyfile", str(certs / "server.key"),
                  "--ca-certfile", str(certs / "ca.crt"), "--auth-key", str(certs)]
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        f = open(base / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(f)
        log.info("%s: %s", name, " ".join(cmd))
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    t0 = time.monotonic()
    try:
        server = start("server", server_cmd)
        for org in range(a.orgs):
            cmd = [*_fedembed(), "client", "--superlink", f"127.0.0.1:{port}", *org_task_args(a, org),
                   "--state-dir", str(base / f"org{org}"), "--root-cert", str(certs / "ca.crt"),
                   "--auth-key", str(certs / f"org-{org}.key"), "--roster", str(certs)]
            start(f"org{org}", cmd + (["--no-worker"] if a.no_worker else []))
        code = server.wait(timeout=a.timeout)
        seconds = time.monotonic() - t0
    finally:
        for p in reversed(procs):
            kill_tree(p)
        for f in logs:
            f.close()
    if code != 0:
        tail = (base / "server.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"fedembed server ({mode}) exited with {code}:\n{tail}")
    summary = summarise(json.loads((base / "server" / "metrics.json").read_text()), a.warmup, seconds)
    summary["server_exit"] = code
    return summary


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 11's targets: deployed plain <= 2x simulated plain and <= 3 s; deployed union <= 1.5x deployed plain."""
    out: dict[str, Any] = {}
    dep, sim = results.get("deployed", {}), results.get("simulated", {})
    if "plain" in dep and "plain" in sim:
        d, s = dep["plain"]["s_per_round"], sim["plain"]["s_per_round"]
        out["deployed_plain_vs_simulated"] = {"ratio": d / s, "target": 2.0, "met": d <= 2.0 * s}
        out["deployed_plain_seconds"] = {"seconds": d, "target": 3.0, "met": d <= 3.0}
    if "plain" in dep and "union" in dep:
        r = dep["union"]["s_per_round"] / dep["plain"]["s_per_round"]
        out["deployed_union_vs_deployed_plain"] = {"ratio": r, "target": 1.5, "met": r <= 1.5}
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the results."""
    lines = ["| run | aggregation | s/round | round trips | stages (s) |", "|---|---|---:|---:|---|"]
    for where in ("simulated", "deployed"):
        for mode, r in results.get(where, {}).items():
            st = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
            lines.append(f"| {where} | {mode} | {r['s_per_round']:.2f} | {r['round_trips']} | {st} |")
    return "\n".join(lines)


def _commit() -> str:
    """The fedembed commit measured (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--orgs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="first rounds left out of the averages")
    p.add_argument("--modes", default="plain,union,dense", help="comma-separated: plain, union, dense")
    p.add_argument("--no-worker", action="store_true", help="deploy without the organisations' long-lived workers")
    p.add_argument("--guard", action="store_true",
                   help="run with the organisations' guard on (opt-in; on by default when the README's figures were "
                        "measured)")
    p.add_argument("--skip-simulated", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    p.add_argument("--out", type=Path, default=Path("runs/deploy_bench"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = a.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}: choose from {sorted(MODES)}")
    certs = root / "certs"
    if not (certs / "ca.crt").exists():
        subprocess.run([*_fedembed(), "certs", str(certs), "--orgs", str(a.orgs)], env=_env(root), check=True,
                       capture_output=True)
    started, load_start = time.time(), os.getloadavg()
    results: dict[str, dict[str, Any]] = {"simulated": {}, "deployed": {}}
    for mode in modes:
        if not a.skip_simulated:
            results["simulated"][mode] = run_simulated(a, mode, root)
            log.info("simulated %s: %.2f s/round", mode, results["simulated"][mode]["s_per_round"])
        results["deployed"][mode] = run_deployed(a, mode, root, certs)
        log.info("deployed %s: %.2f s/round", mode, results["deployed"][mode]["s_per_round"])
    doc = {
        "workload": {"rows": a.rows, "dim": a.dim, "orgs": a.orgs, "rounds": a.rounds, "warmup": a.warmup,
                     "worker": not a.no_worker, "guard": a.guard},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "commit": _commit(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "ended_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "results": results,
        "targets": targets(results),
    }
    (root / "deploy_bench.json").write_text(json.dumps(doc, indent=1))
    print(table(results))
    for name, t in doc["targets"].items():
        value = t.get("ratio", t.get("seconds"))
        print(f"{name}: {value:.2f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
    print(f"load average at start {load_start}, at the end {doc['machine']['load_average_end']}; wrote {root / 'deploy_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
