"""Plain vs secure aggregation on one workload: equality of the final tables, bytes, seconds.

Runs ``fedembed simulate --task synthetic`` (Flower's simulation engine) once plain and once
per ``--row-set`` with the same seed, plus one secure run with injected dropouts, and
prints a markdown table: the largest difference between each secure run's
``embeddings.npz`` and the plain run's, the documented per-round bound, upload bytes per
organisation per round, and seconds per round (round 1, which starts Ray, excluded).

    .venv/bin/python simulations/secure_check.py --out runs/secure-check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def _simulate(out: Path, common: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedembed.cli", "simulate", *common, "--quiet", "--out", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def _tables(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "embeddings.npz") as z:
        return {k: z[k] for k in z.files}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; prints the table and writes ``OUT/secure_check.json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/secure-check"))
    p.add_argument("--orgs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--drop", default="masked@2:3", help="dropout injected in the dropout run (STAGE[@ROUND]:ORG)")
    args = p.parse_args(argv)
    # --seed seeds the run, the task's own seed option its data (both were --seed before)
    common = ["--task", "synthetic", "--orgs", str(args.orgs), "--rounds", str(args.rounds),
              "--seed", str(args.seed), "--option", f"seed={args.seed}", "--option", f"rows={args.rows}"]
    runs = {"plain": []} | {f"secure {rs}": ["--secure", "--row-set", rs] for rs in ("dense", "union", "revealed")}
    # with the default early unmask the dropout's round is abandoned (and the run then recovers dropouts); without
    # it, the dropout is recovered within its round
    runs[f"secure union, drop {args.drop}"] = ["--secure", "--row-set", "union", "--drop", args.drop]
    runs[f"secure union, drop {args.drop}, --no-early-unmask"] = ["--secure", "--row-set", "union", "--drop", args.drop,
                                                                  "--no-early-unmask"]
    docs, tables = {}, {}
    for i, (name, extra) in enumerate(runs.items()):
        out = args.out / f"run-{i}"
        print(f"running {name} ...", file=sys.stderr)
        docs[name] = _simulate(out, common, extra)
        tables[name] = _tables(out)
    plain = tables["plain"]
    dense_per_org = docs["plain"]["rounds"][0]["dense_upload_bytes"] / args.orgs
    rows = []
    for name, doc in docs.items():
        rounds = doc["rounds"]
        # per organisation that answered: an abandoned round sums nobody, yet everyone uploaded
        up = float(np.mean([r["upload_bytes"] / max(r["clients"], len(r.get("metrics", {})), 1) for r in rounds]))
        later = [r["wall_seconds"] for r in rounds[1:]] or [rounds[0]["wall_seconds"]]
        diff = max(float(np.abs(plain[k] - tables[name][k]).max()) for k in plain)
        sec = rounds[-1].get("secure", {})
        rows.append({
            "run": name,
            "max_abs_diff_vs_plain": diff,
            "bit_identical": all(np.array_equal(plain[k], tables[name][k]) for k in plain),
            "bound": sec.get("error_bound"),
            "upload_bytes_per_org_round": up,
            "upload_vs_dense_float32": up / dense_per_org,
            "rows_masked": sec.get("rows"),
            "seconds_per_round": float(np.mean(later)),
            "clients_per_round": [r["clients"] for r in rounds],
            "abandoned": [r.get("abandoned") for r in rounds if r.get("abandoned")],
        })
    (args.out / "secure_check.json").write_text(json.dumps(rows, indent=1))
    print("| run | max abs diff vs plain | bit-identical | bound n/(2s) | upload / org / round | vs dense float32 | rows masked | s / round | clients per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = f"{r['bound']:.2g}" if r["bound"] else "-"
        print(f"| {r['run']} | {r['max_abs_diff_vs_plain']:.3g} | {r['bit_identical']} | {bound} | "
              f"{r['upload_bytes_per_org_round'] / 1e6:.3f} MB | {r['upload_vs_dense_float32']:.4f} | "
              f"{r['rows_masked'] or '-'} | {r['seconds_per_round']:.2f} | {r['clients_per_round']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
