"""What record-level DP costs: fedembed and local at epsilon 1, 4, 8 and without DP, on movies and synthetic.

For each scenario (``movies-same``: 5 organisations of the real movies data, genres
everywhere; ``synthetic``: the small Zipf task of ``simulations/evaluate.py``), each seed
(0, 1, 2) and each privacy level, it runs ``fedembed`` (the federation, shared model
alone) and ``local`` (every organisation alone) and reports

- the **test** score at each organisation's best-**validation** round, mean over
  organisations, mean ± std over seeds (``simulations/evaluate.py``'s ``served``);
- the **upload**: bytes an organisation sends per round (``rounds[i].upload_bytes`` of
  ``metrics.json`` over organisations and rounds; ``local`` sends nothing);
- each organisation's epsilon after the last round (``rounds[-1].privacy``).

**Privacy levels.** ``none`` runs the framework's defaults (what ``evaluate.py`` reports).
At epsilon 1, 4 and 8 (delta 1e-5 per organisation, over the whole run of 10 rounds x 1
epoch), every run uses the record-level, row-sparse DP recipe :data:`DP_RECIPE` (chosen
before these runs, see the README), and the noise multiplier is **calibrated with the
accountant** (:func:`calibrate`): the organisations' ledgers (PLD, Poisson sampling) are
replayed for the run -- ``rounds x ceil(N_i / batch)`` steps at sampling rate
``batch / N_i`` for each organisation's training-set size ``N_i`` -- and the smallest
effective noise multiplier at which no organisation exceeds the target is found by
bisection; it is split between the gradient and the row-count mechanisms equally
(``sigma_grad = sigma_count = sqrt(2) sigma_eff``), the row threshold is
``THRESHOLD_Z x sigma_count``. The recipe's budget (``--target-epsilon``) is the target
itself, so no ledger may pass it. The smallest organisation binds (largest sampling rate);
larger ones end below the target (their epsilons are reported).

Each run writes ``OUT/<scenario>/<mode>/<level>/seed<k>/metrics.json`` through
``simulations/evaluate.py``'s in-process runner (the coordinator and organisation code of
a Flower run); a run whose ``metrics.json`` exists is skipped, so the script resumes where
it stopped. Then ``OUT/dp_eval.json``, ``OUT/dp_eval.md`` and ``OUT/dp_eval.png``.

The organisations' DP noise comes from each one's own secret key (:mod:`fedembed.dp.noise`),
created afresh in a temporary state directory per run: ``fedembed`` DP runs do not repeat
bit for bit (the ``local`` baseline's noise is seeded from the run seed and does).

Usage::

    .venv/bin/python simulations/dp_eval.py --out runs/dp-eval
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedembed.dp.accounting import DPRound, PrivacyLedger, effective_noise_multiplier  # noqa: E402
from fedembed.task import TaskSpec, load_task, parse_options, simulated_federation  # noqa: E402
from simulations.evaluate import SCENARIOS, _mean_std, run_args, run_one, served  # noqa: E402

log = logging.getLogger("dp_eval")

SCENARIO_NAMES = ("movies-same", "synthetic")
MODES = ("fedembed", "local")
LEVELS = ("1", "4", "8", "none")
DELTA = 1e-5
ROUNDS = 10  # the CLI's default, as in evaluate.py
EPOCHS = 1
THRESHOLD_Z = 4.0
"""Row threshold in count-noise standard deviations: a row nobody used is released w.p. 3.2e-5 per step."""
DP_RECIPE: dict[str, Any] = {"batch_size": 32, "dp_clip": 1.0, "dp_count_clip": 1.0, "keep_table_state": False}
"""The DP runs' recipe besides the calibrated noise (everything else: the framework's defaults)."""


def train_sizes(scenario: str, seed: int, orgs: int) -> list[int]:
    """Each simulated organisation's training-set size in this scenario and seed (what sets its sampling rate)."""
    args = SCENARIOS[scenario]
    task = args[args.index("--task") + 1]
    options = [args[i + 1] for i, a in enumerate(args) if a == "--option"] + [f"seed={seed}"]
    tasks, _, _ = simulated_federation(TaskSpec(task, parse_options(options)), orgs)
    return [int(load_task(t).num_examples("train")) for t in tasks]


def run_rounds(n: int, sigma_eff: float, batch: int, rounds: int = ROUNDS, epochs: int = EPOCHS) -> list[DPRound]:
    """The ledger entries of an organisation of ``n`` training examples over the run (as :func:`fedembed.dp.local.dp_epochs` records them)."""
    return [DPRound(sigma_eff, min(1.0, batch / n), epochs * math.ceil(n / batch), population=n)] * rounds


@lru_cache(maxsize=4096)
def run_epsilon(n: int, sigma_eff: float, batch: int) -> float:
    """Epsilon at :data:`DELTA` of an organisation of ``n`` examples after the whole run."""
    return PrivacyLedger(DELTA, rounds=run_rounds(n, sigma_eff, batch)).epsilon()


def calibrate(sizes: list[int], target: float, batch: int, tol: float = 1e-4) -> float:
    """The smallest effective noise multiplier at which every organisation's run epsilon is <= ``target``.

    Bisection on the largest epsilon over organisations (decreasing in the noise), ending
    on the private side.
    """
    lo, hi = 0.2, 1.0
    while max(run_epsilon(n, hi, batch) for n in sizes) > target:
        lo, hi = hi, hi * 2
    while (hi - lo) / hi > tol:
        mid = 0.5 * (lo + hi)
        if max(run_epsilon(n, mid, batch) for n in sizes) > target:
            lo = mid
        else:
            hi = mid
    return hi


def dp_flags(sigma_eff: float, target: float, recipe: dict[str, Any] | None = None, threshold_z: float = THRESHOLD_Z,
             count_ratio: float = 1.0) -> list[str]:
    """``fedembed simulate`` flags of the DP recipe at effective noise multiplier ``sigma_eff``.

    ``count_ratio``: the row-count noise multiplier over the gradient one (1: an equal
    share of the budget); the effective multiplier of the two is ``sigma_eff`` exactly.
    """
    recipe = {**DP_RECIPE, **(recipe or {})}
    sigma = sigma_eff * math.sqrt(1.0 + count_ratio**-2)
    sigma_count = count_ratio * sigma
    assert abs(effective_noise_multiplier(sigma, sigma_count) - sigma_eff) < 1e-9 * sigma_eff
    flags = {"dp-noise-multiplier": sigma, "dp-selection-noise-multiplier": sigma_count,
             "dp-row-threshold": threshold_z * sigma_count * recipe["dp_count_clip"],
             "dp-target-epsilon": target, "dp-target-delta": DELTA,
             **{k.replace("_", "-"): v for k, v in recipe.items() if k != "keep_table_state"}}
    out = [f"--{k}={v!r}" if isinstance(v, float) else f"--{k}={v}" for k, v in flags.items()]
    return out + ([] if recipe["keep_table_state"] else ["--no-keep-table-state"])


def summarise(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Per scenario, mode and level: served test score (mean over orgs; mean ± std over seeds), upload, epsilons."""
    summary: dict[str, Any] = {}
    for scenario in SCENARIO_NAMES:
        for mode in MODES:
            for level in LEVELS:
                paths = [out / scenario / mode / level / f"seed{s}" / "metrics.json" for s in seeds]
                docs = [json.loads(p.read_text()) for p in paths if p.exists()]
                if not docs:
                    continue
                orgs = [k for k in docs[0]["final"] if k != "mean"]
                scores = [float(np.mean([served(d, o)["score"] for o in orgs])) for d in docs]
                vals = [float(np.mean([served(d, o)["val_score"] for o in orgs])) for d in docs]
                uploads = [sum(r["upload_bytes"] for r in d["rounds"]) / max(1, sum(r["clients"] for r in d["rounds"]))
                           for d in docs]
                eps = [max(v["epsilon"] for v in d["rounds"][-1].get("privacy", {}).values() or [{"epsilon": 0.0}])
                       for d in docs]
                calib = [json.loads((p.parent / "dp.json").read_text()) for p in paths
                         if (p.parent / "dp.json").exists()]
                summary.setdefault(scenario, {}).setdefault(mode, {})[level] = {
                    "score": _mean_std(scores), "val_score": _mean_std(vals), "upload_bytes": _mean_std(uploads),
                    "max_epsilon": _mean_std(eps), "seeds": len(docs),
                    "sigma_eff": float(np.mean([c["sigma_eff"] for c in calib])) if calib else 0.0,
                    "min_epsilon": float(np.mean([min(v["epsilon"] for v in d["rounds"][-1]["privacy"].values())
                                                  for d in docs])) if level != "none" else 0.0,
                }
    return summary


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's targets at epsilon 8: fedembed beats local on the mean; upload within 2x of the non-private one."""
    out = []
    for scenario, modes in summary.items():
        f, lo = modes.get("fedembed", {}), modes.get("local", {})
        if "8" in f and "8" in lo:
            gap = f["8"]["score"]["mean"] - lo["8"]["score"]["mean"]
            out.append({"target": f"{scenario}: fedembed - local at epsilon 8", "value": gap, "goal": "> 0",
                        "met": bool(gap > 0)})
        if "8" in f and "none" in f:
            ratio = f["8"]["upload_bytes"]["mean"] / f["none"]["upload_bytes"]["mean"]
            out.append({"target": f"{scenario}: fedembed upload at epsilon 8 / without DP", "value": ratio,
                        "goal": "<= 2", "met": bool(ratio <= 2)})
    return out


def markdown(summary: dict[str, Any], checks: list[dict[str, Any]], seeds: list[int]) -> str:
    """The README table: per scenario and level, both modes' served test scores, fedembed's upload, the epsilons."""
    lines = [f"Test score at the best-validation round (mean over organisations; mean ± std over seeds "
             f"{', '.join(map(str, seeds))}); upload per organisation per round; epsilon at delta {DELTA:g} after "
             "the last round (largest and smallest organisation, mean over seeds).", "",
             "| scenario | epsilon | noise multiplier (effective) | fedembed | local | fedembed − local "
             "| fedembed upload | epsilon reached (max / min org) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scenario, modes in summary.items():
        f, lo = modes.get("fedembed", {}), modes.get("local", {})
        for level in LEVELS:
            if level not in f and level not in lo:
                continue
            cell = lambda m: f"{m[level]['score']['mean']:.4f} ± {m[level]['score']['std']:.4f}" if level in m else "—"  # noqa: E731
            gap = (f"{f[level]['score']['mean'] - lo[level]['score']['mean']:+.4f}"
                   if level in f and level in lo else "—")
            up = f"{f[level]['upload_bytes']['mean'] / 2**20:.3f} MiB" if level in f else "—"
            ref = f.get(level) or lo.get(level)
            sigma = f"{ref['sigma_eff']:.3f}" if level != "none" else "—"
            eps = (f"{ref['max_epsilon']['mean']:.3f} / {ref['min_epsilon']:.3f}" if level != "none" else "—")
            label = "no DP" if level == "none" else level
            lines.append(f"| {scenario} | {label} | {sigma} | {cell(f)} | {cell(lo)} | {gap} | {up} | {eps} |")
    if checks:
        lines += ["", "| target (issue 13) | value | goal | met |", "|---|---:|---|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {c['value']:+.4f} | {c['goal']} | {'yes' if c['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Score against epsilon (both modes) and fedembed's upload against epsilon, one column per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(summary)
    fig, axes = plt.subplots(2, len(scenarios), figsize=(5.5 * len(scenarios), 7), squeeze=False)
    xs = {level: i for i, level in enumerate(LEVELS)}
    labels = ["ε=1", "ε=4", "ε=8", "no DP"]
    for j, scenario in enumerate(scenarios):
        ax = axes[0][j]
        for mode, style in (("fedembed", "o-"), ("local", "s--")):
            rows = summary[scenario].get(mode, {})
            levels = [lv for lv in LEVELS if lv in rows]
            ax.errorbar([xs[lv] for lv in levels], [rows[lv]["score"]["mean"] for lv in levels],
                        yerr=[rows[lv]["score"]["std"] for lv in levels], fmt=style, capsize=3, label=mode)
        ax.set_xticks(range(len(LEVELS)), labels)
        ax.set_title(f"{scenario}: test score (best-validation round)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[1][j]
        rows = summary[scenario].get("fedembed", {})
        levels = [lv for lv in LEVELS if lv in rows]
        ax.bar([xs[lv] for lv in levels], [rows[lv]["upload_bytes"]["mean"] / 2**20 for lv in levels], color="tab:blue")
        ax.set_xticks(range(len(LEVELS)), labels)
        ax.set_title(f"{scenario}: fedembed upload per organisation per round (MiB)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every scenario x mode x level x seed, then write the summary, table and plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "dp-eval")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIO_NAMES, default=list(SCENARIO_NAMES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--orgs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=DP_RECIPE["batch_size"], help="expected batch of the DP runs")
    p.add_argument("--threshold-z", type=float, default=THRESHOLD_Z, help="row threshold in count-noise stds")
    p.add_argument("--count-ratio", type=float, default=1.0, help="row-count noise multiplier / gradient one")
    p.add_argument("--extra", default="", help="more `fedembed simulate` flags for the DP runs (a candidate recipe); "
                   "give each candidate its own --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fedembed").setLevel(logging.ERROR)
    batch = int(args.batch_size)
    recipe = {**DP_RECIPE, "batch_size": batch}
    for scenario in args.scenarios:
        for seed in args.seeds:
            sizes = None
            for level in args.levels:
                for mode in args.modes:
                    out = args.out / scenario / mode / level / f"seed{seed}"
                    if (out / "metrics.json").exists():
                        continue
                    extra: list[str] = []
                    if level != "none":
                        sizes = sizes or train_sizes(scenario, seed, args.orgs)
                        target = float(level)
                        sigma_eff = calibrate(sizes, target, batch)
                        out.mkdir(parents=True, exist_ok=True)
                        (out / "dp.json").write_text(json.dumps({
                            "target_epsilon": target, "delta": DELTA, "sigma_eff": sigma_eff, "train_sizes": sizes,
                            "epsilons": [run_epsilon(n, sigma_eff, batch) for n in sizes], "recipe": recipe,
                            "threshold_z": args.threshold_z, "count_ratio": args.count_ratio, "extra": args.extra}))
                        extra = dp_flags(sigma_eff, target, recipe, args.threshold_z, args.count_ratio) + args.extra.split()
                    t0 = time.perf_counter()
                    run_one(run_args(scenario, mode, seed, None, out, extra, args.orgs), out, "inprocess")
                    doc = json.loads((out / "metrics.json").read_text())
                    log.info("%-11s %-8s eps %-4s seed %d: served test %.4f (%.0f s)", scenario, mode, level, seed,
                             float(np.mean([served(doc, o)["score"] for o in doc["final"] if o != "mean"])),
                             time.perf_counter() - t0)
    summary = summarise(args.out, args.seeds)
    checks = targets(summary)
    (args.out / "dp_eval.json").write_text(json.dumps({"seeds": args.seeds, "recipe": recipe, "delta": DELTA,
                                                       "threshold_z": args.threshold_z, "count_ratio": args.count_ratio,
                                                       "extra": args.extra,
                                                       "summary": summary, "targets": checks}, indent=1))
    md = markdown(summary, checks, args.seeds)
    (args.out / "dp_eval.md").write_text(md)
    plot(summary, args.out / "dp_eval.png")
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
