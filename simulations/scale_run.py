"""Scale run: ``fedembed simulate`` with many organisations, timed, with its memory sampled.

Runs the ``fedembed simulate`` command given after ``--`` (default: the movies task with
100 organisations for 5 rounds) as a child process and samples, twice a second, the
resident memory of its whole process tree (the coordinator's process, Ray's raylet / GCS
and its workers, each organisation's training): the peak of the sum of RSS, the peak of
the sum of PSS (shared pages split between the processes that map them: the honest
total), and the coordinator process's own peak (VmHWM). Writes ``OUT/scale.json`` next
to the run's ``metrics.json``.

Usage::

    .venv/bin/python simulations/scale_run.py --out runs/scale
    .venv/bin/python simulations/scale_run.py --out runs/scale -- --task movies --orgs 140 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.proctree import process_tree, status_kib  # noqa: E402

log = logging.getLogger("fedembed.scale")

DEFAULT_ARGS = ["--task", "movies", "--orgs", "100", "--rounds", "5"]


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree until stopped."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.root_hwm = self.peak_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self._halt.is_set():
            tree = process_tree(self.pid)
            rss = sum(status_kib(p, "VmRSS") for p in tree) * 1024
            pss = sum(status_kib(p, "Pss", "smaps_rollup") for p in tree) * 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.root_hwm = max(self.root_hwm, status_kib(self.pid, "VmHWM") * 1024)
            self.peak_procs = max(self.peak_procs, len(tree))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling."""
        self._halt.set()
        self.join()


def main(argv: list[str] | None = None) -> int:
    """Run the scale simulation and report time and memory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else list(DEFAULT_ARGS)
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/scale"))
    args = p.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exe = Path(sys.executable).with_name("fedembed")
    cmd = [str(exe), "simulate", *extra, "--out", str(args.out), "--quiet"]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - t0
    sampler.stop()
    doc: dict = {
        "command": " ".join(["fedembed", "simulate", *extra]),
        "exit_code": code,
        "seconds": seconds,
        "peak_tree_rss_bytes": sampler.peak_rss,
        "peak_tree_pss_bytes": sampler.peak_pss,
        "coordinator_peak_rss_bytes": sampler.root_hwm,
        "peak_processes": sampler.peak_procs,
        "cpus": os.cpu_count(),
    }
    metrics = args.out / "metrics.json"
    if code == 0 and metrics.exists():
        m = json.loads(metrics.read_text())
        doc["rounds"] = [
            {k: r.get(k) for k in ("round", "clients", "wall_seconds", "upload_bytes", "download_bytes")} for r in m["rounds"]
        ]
        doc["closing_evaluation_seconds"] = m.get("closing_evaluation", {}).get("seconds")
        doc["final_mean_score"] = m.get("final", {}).get("mean", {}).get("score")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(doc, indent=1))
    log.info(
        "exit %d in %.0f s; peak memory: tree RSS %.2f GiB, tree PSS %.2f GiB, coordinator %.2f GiB",
        code, seconds, sampler.peak_rss / 2**30, sampler.peak_pss / 2**30, sampler.root_hwm / 2**30,
    )
    for r in doc.get("rounds", []):
        log.info("round %d: %d orgs, %.1f s", r["round"], r["clients"], r["wall_seconds"])
    return code


if __name__ == "__main__":
    sys.exit(main())
