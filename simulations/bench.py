"""Benchmark: fedembed against Flower 1.42's dense FedAvg and SecAgg+, side by side.

One synthetic workload per invocation (Zipf-popular ids, ``--rows`` x ``--dim`` table,
``--orgs`` organisations each touching about ``--touch`` of the rows per round). Every
method runs on Flower's simulation engine (Ray), in its own fresh Python process, with
the same local training in every organisation (see :mod:`simulations.flower_baselines`):

==================  ===========================================================
flower-fedavg       Flower Message API FedAvg, float32 table in an ArrayRecord
flower-secaggplus   Flower legacy SecAggPlusWorkflow + secaggplus_mod
fedembed-plain      fedembed, row-sparse, no secure aggregation
fedembed-dense      fedembed secure aggregation, row set ``dense``
fedembed-union      fedembed secure aggregation, row set ``union``
fedembed-revealed   fedembed secure aggregation, row set ``revealed``
fedembed-union-     ``fedembed-union`` with the local recipe a user gets by default
defaults            (``TrainConfig()``), where every other method pins the recipe the
                    Flower clients share (batch 64, no kept table-optimizer state)
==================  ===========================================================

Measured per method: upload and download bytes per organisation per round (serialized
content of every message, :func:`fedembed.wire.record_bytes`), seconds per round and per
stage, and the coordinator's peak memory: the peak resident set (``VmHWM``) of the
process that runs the ServerApp and Flower's in-memory SuperLink (Ray's organisations are
separate processes), reset with ``/proc/self/clear_refs`` after imports; reported as
the peak and as the rise above the process at reset. The first ``--warmup`` rounds
(Ray actor start-up, data loading in the workers) are run but left out of the averages.

Usage::

    .venv/bin/python simulations/bench.py --rows 1000000 --dim 64 --orgs 5 --touch 0.01 --rounds 2 --out runs/bench
    .venv/bin/python simulations/bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.flower_baselines import Workload, workload_from_json  # noqa: E402
from simulations.proctree import tree_cpu_seconds  # noqa: E402

log = logging.getLogger("fedembed.bench")

METHODS = ("flower-fedavg", "flower-secaggplus", "fedembed-plain", "fedembed-dense", "fedembed-union", "fedembed-revealed",
           "fedembed-union-defaults", "fedembed-union-pooled")
SECURE_ROW_SET = {"fedembed-dense": "dense", "fedembed-union": "union", "fedembed-revealed": "revealed",
                  "fedembed-union-defaults": "union", "fedembed-union-pooled": "union"}


def method_train_config(method: str) -> Any:
    """The local recipe ``method`` runs: the library's defaults for ``*-defaults``, else the pinned one
    (``*-pooled``: the pinned one with the pooled normaliser, :mod:`fedembed.normaliser`)."""
    from dataclasses import replace

    from fedembed.recipe import TrainConfig
    from simulations import flower_baselines as fb

    if method.endswith("-defaults"):
        return TrainConfig()
    pinned = fb.bench_train_config()
    return replace(pinned, pooled_normaliser=True) if method.endswith("-pooled") else pinned
QUICK = {"rows": 20_000, "dim": 16, "orgs": 3, "touch": 0.02, "rounds": 1, "warmup": 1}


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; returns that RSS in bytes.

    Writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). When that is refused, the
    peak is left as is and the caller gets the current RSS all the same.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        log.warning("cannot reset the peak RSS (%s); the peak includes start-up", exc)
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS of this process since the last reset, in bytes."""
    return _status_kib("VmHWM") * 1024


# --------------------------------------------------------------------------- one method (child)


def _fedembed_rounds(method: str, work: Workload, total_rounds: int, num_cpus: int, out: Path) -> list[dict]:
    from fedembed.config import RunConfig
    from fedembed.simulation import simulate
    from fedembed.task import TaskSpec, simulated_federation

    secure = method in SECURE_ROW_SET
    # every organisation's own task (the one the Flower baselines' ClientApps build, Workload.org_task)
    tasks, names, federation = simulated_federation(TaskSpec("synthetic", work.task_options()), work.orgs)
    assert tasks == [work.org_task(o) for o in range(work.orgs)]
    cfg = RunConfig(
        federation=federation,
        rounds=total_rounds,
        mode="fedembed",
        seed=work.seed,
        secure=secure,
        row_set=SECURE_ROW_SET.get(method, "union"),
        neighbours=work.shares - 1 if secure else None,
        threshold=work.threshold if secure else None,
        train=method_train_config(method),
    )
    cpu_at_end: dict[int, float] = {}

    def on_round(entry: dict) -> None:
        if not entry.get("closing"):
            cpu_at_end[int(entry["round"])] = tree_cpu_seconds()

    cpu_start = tree_cpu_seconds()
    runlog = simulate(cfg, tasks, out / method, num_cpus=num_cpus, on_round=on_round, names=names)
    rounds = [dict(r) for r in runlog.rounds]
    for r in rounds:  # a round's CPU: from the end of the previous one to its own end
        n = int(r["round"])
        if n in cpu_at_end:
            r["cpu_seconds"] = cpu_at_end[n] - cpu_at_end.get(n - 1, cpu_start)
    return rounds


def start_ray(num_cpus: int) -> None:
    """Start Ray in this process as Flower's Ray backend would, so its fixed cost precedes the peak reset.

    Flower's backend leaves an initialised Ray as it is (and shuts it down at the end).
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, num_cpus=num_cpus, num_gpus=0,
             logging_level="error", log_to_driver=True, include_dashboard=False)


def run_one(method: str, work: Workload, warmup: int, num_cpus: int, out: Path) -> dict[str, Any]:
    """Run one method in this process; returns its measurements (see module docstring).

    Imports and Ray's start-up come before the peak-memory reset: the reported rise is
    what the run itself added to the coordinator's process.
    """
    import flwr.simulation  # noqa: F401
    import torch  # noqa: F401

    import fedembed.coordinator  # noqa: F401
    import fedembed.simulation  # noqa: F401
    from simulations import flower_baselines as fb

    start_ray(num_cpus)

    total = warmup + work.rounds
    run_work = Workload(**{**asdict(work), "rounds": total})
    start_rss = reset_peak_rss()
    t0 = time.perf_counter()
    if method == "flower-fedavg":
        rounds = fb.run_flower_fedavg(run_work, num_cpus).rounds("train")
    elif method == "flower-secaggplus":
        rounds = fb.run_flower_secaggplus(run_work, num_cpus).rounds("setup")
    elif method.startswith("fedembed-"):
        rounds = _fedembed_rounds(method, run_work, total, num_cpus, out)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    total_seconds = time.perf_counter() - t0
    return {
        "method": method,
        "workload": asdict(work),
        "train": method_train_config(method).to_dict(),
        "rounds": rounds,
        "warmup": warmup,
        "total_seconds": total_seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": peak_rss(),
    }


# --------------------------------------------------------------------------- summary


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Per-organisation, per-round means over the measured (non-warm-up) rounds."""
    rounds = [r for r in res["rounds"] if r["round"] > res["warmup"]] or res["rounds"]
    n = len(rounds)
    per_org = lambda key: sum(r[key] / max(r.get("clients") or 1, 1) for r in rounds) / n  # noqa: E731
    stages: dict[str, float] = {}
    for r in rounds:
        for name, st in (r.get("stages") or {}).items():
            stages[name] = stages.get(name, 0.0) + float(st.get("seconds", 0.0)) / n
    return {
        "measured_rounds": [r["round"] for r in rounds],
        "clients": rounds[-1].get("clients"),
        "upload_per_org": per_org("upload_bytes"),
        "download_per_org": per_org("download_bytes"),
        "seconds_per_round": sum(float(r["wall_seconds"]) for r in rounds) / n,
        "cpu_seconds_per_round": (sum(float(r["cpu_seconds"]) for r in rounds) / n
                                  if all("cpu_seconds" in r for r in rounds) else None),
        "stage_seconds": stages,
        "peak_rss_bytes": res["peak_rss_bytes"],
        "peak_rise_bytes": res["peak_rss_bytes"] - res["start_rss_bytes"],
        "reused": res.get("reused"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def evaluate_targets(s: dict[str, dict[str, Any]], work: Workload) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value, the bound and met / not met / not run."""
    table_bytes = work.rows * work.dim * 4
    fedavg, sap = s.get("flower-fedavg"), s.get("flower-secaggplus")
    plain, union, dense = s.get("fedembed-plain"), s.get("fedembed-union"), s.get("fedembed-dense")
    dense_f32 = fedavg["upload_per_org"] if fedavg else table_bytes
    t: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float | None, bound: float, higher_is_better: bool, what: str) -> None:
        op = ">=" if higher_is_better else "<="
        if value is None:
            t[name] = {"what": what, "value": None, "bound": bound, "op": op, "status": "not run"}
            return
        met = value >= bound if higher_is_better else value <= bound
        t[name] = {"what": what, "value": value, "bound": bound, "op": op, "status": "met" if met else "not met"}

    add("plain_upload_vs_dense_f32", _ratio(dense_f32, plain and plain["upload_per_org"]), 50, True,
        "dense float32 upload / fedembed plain upload (per org per round)")
    add("union_upload_vs_secaggplus", _ratio(sap and sap["upload_per_org"], union and union["upload_per_org"]), 30, True,
        "Flower SecAgg+ upload / fedembed union upload")
    add("union_speed_vs_secaggplus", _ratio(sap and sap["seconds_per_round"], union and union["seconds_per_round"]), 15,
        True, "Flower SecAgg+ s/round / fedembed union s/round")
    tot = lambda x: x and x["upload_per_org"] + x["download_per_org"]  # noqa: E731
    add("dense_bytes_vs_secaggplus", _ratio(tot(sap), tot(dense)), 2, True,
        "Flower SecAgg+ (up+down) / fedembed secure dense (up+down), per org per round")
    add("dense_speed_vs_secaggplus", _ratio(sap and sap["seconds_per_round"], dense and dense["seconds_per_round"]), 3,
        True, "Flower SecAgg+ s/round / fedembed secure dense s/round")
    add("union_time_vs_plain", _ratio(union and union["seconds_per_round"], plain and plain["seconds_per_round"]), 2,
        False, "fedembed union s/round / fedembed plain s/round")
    defaults = s.get("fedembed-union-defaults")
    add("union_defaults_vs_pinned", _ratio(defaults and defaults["seconds_per_round"], union and union["seconds_per_round"]),
        1.5, False, "fedembed union s/round with the default recipe / with the pinned recipe")
    ours = {m: v for m, v in s.items() if m.startswith("fedembed-")}
    worst = max((v["peak_rise_bytes"] for v in ours.values()), default=None)
    add("coordinator_memory_vs_table", worst / table_bytes if worst is not None else None, 3, False,
        "largest coordinator peak rise over fedembed methods / table bytes")
    cpu = lambda x: x and x.get("cpu_seconds_per_round")  # noqa: E731
    for name, a, b, what in (
        ("union_cpu_vs_secaggplus", sap, union, "Flower SecAgg+ / fedembed union"),
        ("dense_cpu_vs_secaggplus", sap, dense, "Flower SecAgg+ / fedembed secure dense"),
        ("union_cpu_vs_plain", union, plain, "fedembed union / fedembed plain"),
    ):
        t[name] = {"what": f"(info) CPU seconds per round of the process tree: {what}", "value": _ratio(cpu(a), cpu(b))}
    pooled = s.get("fedembed-union-pooled")
    t["union_pooled_upload_vs_union"] = {
        "what": "(info) fedembed union upload with the pooled normaliser / without",
        "value": _ratio(pooled and pooled["upload_per_org"], union and union["upload_per_org"]),
    }
    t["union_pooled_time_vs_union"] = {
        "what": "(info) fedembed union s/round with the pooled normaliser / without",
        "value": _ratio(pooled and pooled["seconds_per_round"], union and union["seconds_per_round"]),
    }
    t["dense_upload_only_vs_secaggplus"] = {
        "what": "(info) Flower SecAgg+ upload / fedembed secure dense upload",
        "value": _ratio(sap and sap["upload_per_org"], dense and dense["upload_per_org"]),
    }
    return t


def _mib(b: float | None) -> str:
    return "-" if b is None else (f"{b / 2**20:,.1f}" if b >= 2**20 / 10 else f"{b / 2**10:,.1f} KiB")


def print_report(s: dict[str, dict[str, Any]], targets: dict[str, dict[str, Any]], work: Workload) -> None:
    """The table, the ratios against both Flower baselines and the targets (rich)."""
    from rich.console import Console
    from rich.table import Table

    c = Console(width=200)
    fedavg, sap = s.get("flower-fedavg"), s.get("flower-secaggplus")
    tab = Table(title=(f"{work.rows:,} x {work.dim} table, {work.orgs} orgs, touch {work.touch}, "
                       f"{work.rounds} measured round(s); per organisation per round; MiB"))
    for col in ("method", "up MiB", "down MiB", "s/round", "CPU s/round", "stages (s)", "coord. peak MiB (rise)",
                "up vs FedAvg", "up vs SecAgg+", "speed vs SecAgg+ (CPU)"):
        tab.add_column(col, justify="left" if col in ("method", "stages (s)") else "right")
    for m, v in s.items():
        stages = " ".join(f"{k} {x:.1f}" for k, x in v["stage_seconds"].items())
        up_fa = _ratio(fedavg and fedavg["upload_per_org"], v["upload_per_org"])
        up_sa = _ratio(sap and sap["upload_per_org"], v["upload_per_org"])
        sp_sa = _ratio(sap and sap["seconds_per_round"], v["seconds_per_round"])
        cpu_sa = _ratio(sap and sap.get("cpu_seconds_per_round"), v.get("cpu_seconds_per_round"))
        cpu = v.get("cpu_seconds_per_round")
        tab.add_row(m + (" (reused)" if v.get("reused") else ""), _mib(v["upload_per_org"]), _mib(v["download_per_org"]),
                    f"{v['seconds_per_round']:.2f}", "-" if cpu is None else f"{cpu:.1f}", stages,
                    f"{v['peak_rss_bytes'] / 2**20:,.0f} ({v['peak_rise_bytes'] / 2**20:,.0f})",
                    *[f"{x:,.1f}x" if x else "-" for x in (up_fa, up_sa)],
                    (f"{sp_sa:,.1f}x" if sp_sa else "-") + (f" ({cpu_sa:,.1f}x)" if cpu_sa else ""))
    c.print(tab)
    tt = Table(title="targets")
    for col in ("target", "measured", "bound", "status"):
        tt.add_column(col)
    for name, v in targets.items():
        if "status" not in v:
            continue
        val = "-" if v["value"] is None else f"{v['value']:.2f}"
        style = {"met": "green", "not met": "red"}.get(v["status"], "yellow")
        tt.add_row(v["what"], val, f"{v['op']} {v['bound']}",
                   f"[{style}]{v['status']}[/]")
    c.print(tt)
    for name, v in targets.items():
        if "status" not in v and v.get("value") is not None:
            c.print(f"{v['what']}: {v['value']:.2f}")


def markdown_report(s: dict[str, dict[str, Any]], targets: dict[str, dict[str, Any]]) -> str:
    """The table and the targets as Markdown (for the README)."""
    sap = s.get("flower-secaggplus")
    lines = ["| method | upload MiB | download MiB | s/round | CPU s/round | secure stages (s) | coordinator peak rise MiB "
             "| upload vs SecAgg+ | speed vs SecAgg+ |", "|---|--:|--:|--:|--:|---|--:|--:|--:|"]
    for m, v in s.items():
        stages = ", ".join(f"{k} {x:.1f}" for k, x in v["stage_seconds"].items() if k not in ("train", "aggregate"))
        up = _ratio(sap and sap["upload_per_org"], v["upload_per_org"])
        sp = _ratio(sap and sap["seconds_per_round"], v["seconds_per_round"])
        cpu = v.get("cpu_seconds_per_round")
        lines.append(f"| {m} | {v['upload_per_org'] / 2**20:,.2f} | {v['download_per_org'] / 2**20:,.2f} | "
                     f"{v['seconds_per_round']:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} | {stages or '-'} | "
                     f"{v['peak_rise_bytes'] / 2**20:,.0f} | {f'{up:,.1f}x' if up else '-'} | {f'{sp:,.1f}x' if sp else '-'} |")
    lines += ["", "| target | measured | bound | status |", "|---|--:|--:|---|"]
    for name, v in targets.items():
        if "status" in v:
            op = v["op"]
            val = "-" if v["value"] is None else f"{v['value']:.2f}"
            lines.append(f"| {v['what']} | {val} | {op} {v['bound']} | {v['status']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--orgs", type=int, default=5)
    p.add_argument("--touch", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=2, help="measured rounds")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and left out (Ray start-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shares", type=int, default=None,
                   help="SecAgg+ shares per secret incl. the owner's (Flower's num_shares; default: all orgs)")
    p.add_argument("--threshold", type=int, default=None,
                   help="Shamir threshold t (default: fedembed's, a strict majority of the k = shares - 1 neighbours)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation engine (default: all)")
    p.add_argument("--quick", action="store_true", help=f"small workload {QUICK}")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds allowed per method")
    p.add_argument("--reuse", default="",
                   help="comma-separated methods whose result already in OUT (same workload and warm-up) is reused "
                        "instead of re-run, e.g. flower-secaggplus (marked 'reused' in the JSON)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: run one method
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p


def _workload(args: argparse.Namespace) -> Workload:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    from fedembed.secagg.graph import default_neighbours, default_threshold

    shares = args.shares or default_neighbours(args.orgs) + 1
    threshold = args.threshold or default_threshold(shares - 1)
    return Workload(rows=args.rows, dim=args.dim, orgs=args.orgs, touch=args.touch, seed=args.seed, rounds=args.rounds,
                    shares=shares, threshold=threshold)


def main(argv: list[str] | None = None) -> int:
    """Run every method in its own process, then print and write the comparison."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    cpus = args.cpus or os.cpu_count() or 1
    if args.one:  # child
        work = workload_from_json(args.work)
        res = run_one(args.one, work, args.warmup, cpus, args.out)
        (args.out / f"{args.one}.json").write_text(json.dumps(res, indent=1, default=float))
        return 0

    work = _workload(args)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        log.error("unknown methods %s; choose from %s", bad, ", ".join(METHODS))
        return 2
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    reuse = {m.strip() for m in args.reuse.split(",") if m.strip()}
    for m in methods:
        path = args.out / f"{m}.json"
        if m in reuse and path.exists():
            old = json.loads(path.read_text())
            if old.get("workload") == asdict(work) and old.get("warmup") == args.warmup:
                when = old.get("finished") or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))
                log.info("%s: reusing %s (measured %s)", m, path, when)
                raw[m] = {**old, "reused": when}
                continue
            log.warning("%s: %s is for another workload; running it again", m, path)
        log.info("running %s ...", m)
        path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", m, "--work", json.dumps(asdict(work)),
               "--warmup", str(args.warmup), "--cpus", str(cpus), "--out", str(args.out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            errors[m] = f"timed out after {args.timeout:.0f} s"
            log.error("%s: %s", m, errors[m])
            continue
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or "").strip().splitlines()[-15:]
            errors[m] = "\n".join(tail) or f"exit code {proc.returncode}"
            log.error("%s failed (exit %d):\n%s", m, proc.returncode, errors[m])
            continue
        raw[m] = json.loads(path.read_text())
        log.info("%s done in %.0f s", m, time.perf_counter() - t0)

    summary = {m: summarise(r) for m, r in raw.items()}
    targets = evaluate_targets(summary, work)
    print_report(summary, targets, work)
    doc = {
        "workload": asdict(work),
        "warmup_rounds": args.warmup,
        "machine": {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "methods": summary,
        "targets": targets,
        "errors": errors,
        "raw": raw,
    }
    (args.out / "bench.json").write_text(json.dumps(doc, indent=1, default=float))
    (args.out / "bench.md").write_text(markdown_report(summary, targets) + "\n")
    print(f"wrote {args.out / 'bench.json'}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
