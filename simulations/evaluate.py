"""Does federating pay off? fedembed vs local, fedavg-all and pooled, 3 seeds, 3 scenarios.

Runs every ``--mode`` of ``fedembed simulate`` with the framework's defaults (the CLI's,
10 rounds; nothing tuned here and nothing chosen on the test split), except the guard:
``fedembed`` runs with it on (``--guard``; it is opt-in) and the ``fedembed-noguard``
ablation with it off. The seed of a run is both the run's ``--seed`` (tables, sampling,
shuffling) and every organisation's task seed (``--option seed=K``: data split, head
initialisation). The scenarios:

- ``movies-same``: 5 organisations of the real movies data, every one predicting genres;
- ``movies-mixed``: the same organisations with different targets (genres, decade,
  critics' meter); ``fedavg-all`` is skipped (heads differ);
- ``synthetic``: 5 organisations over a small Zipf table (20k rows, 1000 examples each,
  each touching ~5% of the rows).

Each run writes ``OUT/<scenario>/<mode>/seed<k>/metrics.json`` (the same file
``fedembed simulate`` writes); a run whose ``metrics.json`` exists is skipped, so the
script resumes where it stopped. Then ``OUT/evaluate.json`` and ``OUT/evaluate.md`` hold
the final test score per organisation and the mean, as mean ± std over the seeds, and the
issue's targets checked against them.

By default the organisations run in this process (the coordinator and organisation code
of a Flower run, minus Flower: the results equal the Flower simulation's, and it is much
faster on a small machine); ``--engine flower`` runs ``fedembed simulate`` instead.

Usage::

    .venv/bin/python simulations/evaluate.py --out runs/evaluate
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedembed.cli import build_parser, config_from_args  # noqa: E402
from fedembed.config import RunConfig  # noqa: E402
from fedembed.coordinator import Coordinator, Reply  # noqa: E402
from fedembed.identity import Identity, make_identities  # noqa: E402
from fedembed.org import Organisation, handle_content  # noqa: E402
from fedembed.task import TaskSpec, load_task, parse_options, simulated_federation  # noqa: E402

log = logging.getLogger("evaluate")

MODES = ("fedembed", "local", "fedavg-all", "pooled")
#: Ablation: fedembed with the guard off (the shared model always served).
NO_GUARD = "fedembed-noguard"
SCENARIOS: dict[str, list[str]] = {
    "movies-same": ["--task", "movies", "--option", "scenario=same"],
    "movies-mixed": ["--task", "movies", "--option", "scenario=mixed"],
    "synthetic": ["--task", "synthetic", "--option", "rows=20000", "--option", "touch=0.05", "--option", "examples=1000"],
}
HEADS_DIFFER = {"movies-mixed"}
GUARD_NAMES = {"shared": 1.0, "blend": 0.5, "local twin": 0.0}
ROUNDS = None  # None: the CLI's default (10 rounds x 1 local epoch)  # fedavg-all needs identical heads


class InProcessTransport:
    """Delivers the coordinator's messages to organisations in this process (no Flower).

    Parameters
    ----------
    state_root : Path
        Parent of each organisation's private state directory.
    tasks : list[TaskSpec]
        Each organisation's own task (node ids 100, 101, ...).
    names : list[str]
        Their roster names.
    """

    def __init__(self, state_root: Path, tasks: list[TaskSpec], names: list[str]) -> None:
        # each organisation signs its replies with its own key; the coordinator knows the roster
        self.roster = make_identities(names, state_root / "keys")
        self.orgs = {
            100 + i: Organisation(i, state_root / f"org-{i}", Identity.load(state_root / "keys" / f"{i}.key", self.roster),
                                  task=task)
            for i, task in enumerate(tasks)
        }

    def node_ids(self, minimum: int, timeout: float) -> list[int]:
        """Every organisation is always connected."""
        return sorted(self.orgs)

    def exchange(self, message_type: str, contents: dict, timeout: float) -> list[Reply]:
        """Hand each message to its organisation and collect the replies."""
        return [Reply(node, handle_content(self.orgs[node], content, message_type, node)) for node, content in contents.items()]


def run_args(scenario: str, mode: str, seed: int, rounds: int | None, out: Path, extra: list[str] | None = None) -> list[str]:
    """``fedembed simulate`` arguments of one run (defaults for everything not named).

    ``seed`` seeds the run and every organisation's task (its data split); ``fedembed``
    turns the guard on, ``fedembed-noguard`` (the ablation) off; the guard acts in
    ``fedembed`` mode only, so the other modes leave it at its default.
    """
    guard = {"fedembed": ["--guard"], NO_GUARD: ["--no-guard"]}.get(mode, [])
    mode = "fedembed" if mode == NO_GUARD else mode
    args = ["simulate", *SCENARIOS[scenario], "--option", f"seed={seed}", "--orgs", "5", "--mode", mode,
            "--seed", str(seed), *guard, "--out", str(out)]
    if rounds is not None:
        args += ["--rounds", str(rounds)]
    return args + list(extra or [])


def run_one(args: list[str], out: Path, engine: str) -> None:
    """Run one simulation (``fedembed simulate`` ``args``), writing ``out/metrics.json``."""
    if engine == "flower":
        exe = Path(sys.executable).with_name("fedembed")
        subprocess.run([str(exe), *args, "--quiet", "--cpus", "1"], check=True, cwd=ROOT)
        return
    parsed = build_parser().parse_args(args)
    # as `fedembed simulate` does: every organisation's own task, their names, the federation they share
    tasks, names, federation = simulated_federation(TaskSpec(parsed.task, parse_options(parsed.option)), parsed.orgs)
    cfg: RunConfig = config_from_args(parsed, federation)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode != "fedembed":
        from fedembed.baselines import run_baseline

        runlog, tables = run_baseline(cfg, [load_task(t) for t in tasks], names)
    else:
        with tempfile.TemporaryDirectory() as state:
            coordinator = Coordinator(cfg, InProcessTransport(Path(state), tasks, names))
            runlog = coordinator.run()
            tables = coordinator.tables.tables
    runlog.write(out, tables)


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def summarise(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Per scenario, mode and organisation: final test score, mean and std over seeds."""
    summary: dict[str, Any] = {}
    for scenario in SCENARIOS:
        summary[scenario] = {}
        for mode in (*MODES, NO_GUARD):
            docs = [out / scenario / mode / f"seed{s}" / "metrics.json" for s in seeds]
            docs = [json.loads(p.read_text()) for p in docs if p.exists()]
            if not docs:
                continue
            orgs = [k for k in docs[0]["final"] if k != "mean"]
            row = {o: _mean_std([d["final"][o]["score"] for d in docs]) for o in orgs}
            row["mean"] = _mean_std([d["final"]["mean"]["score"] for d in docs])
            served = [d["final"][o].get("guard_weight") for d in docs for o in orgs]
            if all(v is not None for v in served):  # share of (organisation, seed) pairs per served candidate
                row["guard_served"] = {k: float(np.mean([v == w for v in served])) for k, w in GUARD_NAMES.items()}
            summary[scenario][mode] = row
    return summary


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on the mean over seeds: (name, value, goal, met)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, goal: float) -> None:
        out.append({"target": name, "value": round(value, 4), "goal": goal, "met": bool(value >= goal), "margin": round(value - goal, 4)})

    same = summary.get("movies-same", {})
    if {"fedembed", "local", "pooled"} <= set(same):
        f, lo, p = same["fedembed"], same["local"], same["pooled"]
        add("same: fedembed - pooled (mean)", f["mean"]["mean"] - p["mean"]["mean"], 0.02)
        add("same: fedembed - local (mean)", f["mean"]["mean"] - lo["mean"]["mean"], 0.05)
        for org in ("Canada", "Germany"):  # the two smallest organisations
            add(f"same: fedembed - local ({org})", f[org]["mean"] - lo[org]["mean"], 0.08)
    mixed = summary.get("movies-mixed", {})
    if {"fedembed", "local"} <= set(mixed):
        f, lo = mixed["fedembed"], mixed["local"]
        add("mixed: fedembed - local (mean)", f["mean"]["mean"] - lo["mean"]["mean"], 0.03)
        for org in (k for k in f if k not in ("mean", "guard_served")):
            add(f"mixed: fedembed - local ({org})", f[org]["mean"] - lo[org]["mean"], 0.0)
    return out


def markdown(summary: dict[str, Any], checks: list[dict[str, Any]], seeds: list[int]) -> str:
    """The README table: one block per scenario, modes as columns, mean ± std over seeds."""
    lines = []
    for scenario, modes in summary.items():
        if not modes:
            continue
        names = list(modes)
        orgs = [k for k in modes[names[0]] if k not in ("mean", "guard_served")]
        lines += [f"**{scenario}** (test score, mean ± std over seeds {', '.join(map(str, seeds))})", ""]
        lines += ["| organisation | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for org in [*orgs, "mean"]:
            cells = []
            for m in names:
                v = modes[m].get(org)
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}" if v else "—")
            label = f"**{org}**" if org == "mean" else org
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if "guard_served" in modes.get("fedembed", {}):
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in modes["fedembed"]["guard_served"].items())
            lines += ["", f"fedembed's guard served, over (organisation, seed) pairs after the last round: {shares}."]
        lines.append("")
    if checks:
        lines += ["**Targets** (issue 6)", "", "| target | value | goal | met |", "|---|---:|---:|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {c['value']:+.4f} | ≥ {c['goal']:+.2f} | {'yes' if c['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every scenario x mode x seed, then write the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "evaluate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=ROUNDS, help="rounds per run (default: the CLI's)")
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--modes", nargs="+", choices=[*MODES, NO_GUARD], default=[*MODES, NO_GUARD],
                   help=f"{NO_GUARD}: fedembed with the guard off")
    p.add_argument("--engine", choices=["inprocess", "flower"], default="inprocess")
    p.add_argument("--extra", default="", help="more `fedembed simulate` flags for every run (a candidate recipe), "
                   "e.g. \"--head-epochs 1\"; give each candidate its own --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fedembed").setLevel(logging.ERROR)
    for scenario in args.scenarios:
        for mode in args.modes:
            if mode == "fedavg-all" and scenario in HEADS_DIFFER:
                continue
            for seed in args.seeds:
                out = args.out / scenario / mode / f"seed{seed}"
                if (out / "metrics.json").exists():
                    continue
                t0 = time.perf_counter()
                run_one(run_args(scenario, mode, seed, args.rounds, out, args.extra.split()), out, args.engine)
                score = json.loads((out / "metrics.json").read_text())["final"]["mean"]["score"]
                log.info("%-13s %-10s seed %d: mean score %.4f (%.0f s)", scenario, mode, seed, score, time.perf_counter() - t0)
    summary = summarise(args.out, args.seeds)
    checks = targets(summary)
    (args.out / "evaluate.json").write_text(json.dumps({"seeds": args.seeds, "summary": summary, "targets": checks}, indent=1))
    md = markdown(summary, checks, args.seeds)
    (args.out / "evaluate.md").write_text(md)
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
