"""The ``fedembed`` command line: ``simulate`` and ``report``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedembed.config import MODES, ROW_SETS, ConfigError, RunConfig
from fedembed.task import BUILTIN_TASKS, TaskError, TaskSpec
from fedembed.train import TABLE_OPTIMIZERS, TrainConfig

log = logging.getLogger("fedembed")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a local multi-organisation simulation on Flower's simulation engine",
        description=(
            "Run organisations and a coordinator on this machine (Flower simulation engine, Ray). "
            "Writes OUT/metrics.json (per-round bytes and per-organisation metrics), "
            "OUT/embeddings.npz (final shared tables) and OUT/report.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="movies", help=f"{' | '.join(BUILTIN_TASKS)} | package.module:TaskClass")
    p.add_argument("--orgs", type=_positive_int, default=5, help="number of organisations")
    p.add_argument("--rounds", type=_positive_int, default=10, help="federated rounds")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, tables and shuffling")
    p.add_argument("--mode", choices=MODES, default="fedembed",
                   help="fedembed: shared tables + private heads; local: no federation; "
                        "fedavg-all: heads averaged too; pooled: centralised upper bound")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory")
    g = p.add_argument_group("task options")
    g.add_argument("--scenario", choices=["same", "mixed"], default=None,
                   help="movies: every org predicts genres (same) or orgs predict different targets (mixed)")
    g.add_argument("--rows", type=_positive_int, default=None, help="synthetic: table rows (default 100000)")
    g.add_argument("--dim", type=_positive_int, default=None, help="embedding dimension (default 32)")
    g.add_argument("--touch", type=float, default=None, help="synthetic: fraction of rows an org touches per round (0.01)")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option passed to the task (JSON value or string); repeatable")
    t = p.add_argument_group("training recipe")
    d = TrainConfig()
    t.add_argument("--epochs", type=_positive_int, default=d.epochs, help="local epochs per round")
    t.add_argument("--head-epochs", type=int, default=d.head_epochs, help="head-only re-fit epochs before the table is touched")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    t.add_argument("--table-lr", type=float, default=d.table_lr)
    t.add_argument("--head-lr", type=float, default=d.head_lr)
    t.add_argument("--table-optimizer", choices=TABLE_OPTIMIZERS, default=d.table_optimizer)
    t.add_argument("--server-optimizer", choices=["sgd", "adagrad"], default="sgd")
    t.add_argument("--server-lr", type=float, default=1.0)
    t.add_argument("--table-scale", type=float, default=0.1, help="std of the seeded version-0 tables")
    t.add_argument("--fraction", type=float, default=1.0, help="share of organisations sampled per round")
    w = p.add_argument_group("wire")
    w.add_argument("--wire-dtype", choices=["float16", "float32"], default="float16", help="dtype of uploaded deltas")
    w.add_argument("--max-message-mb", type=float, default=512.0, help="replies larger than this are refused")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation engine (default: all)")
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, Flower's included")


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"orgs": args.orgs, "seed": args.seed}
    for key, attr in (("scenario", "scenario"), ("rows", "rows"), ("dim", "dim"), ("touch", "touch")):
        if getattr(args, attr) is not None:
            opts[key] = getattr(args, attr)
    for kv in args.task_option:
        if "=" not in kv:
            raise ConfigError(f"--task-option takes KEY=VALUE, got {kv!r}")
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    if args.task == "movies" and args.rows is not None:
        raise ConfigError("--rows applies to --task synthetic only (movies' table is its people)")
    if args.touch is not None and not 0 < args.touch <= 1:
        raise ConfigError(f"--touch must be in (0, 1], got {args.touch}")
    return opts


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` described by ``fedembed simulate`` arguments."""
    train = TrainConfig(
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        batch_size=args.batch_size,
        table_lr=args.table_lr,
        head_lr=args.head_lr,
        table_optimizer=args.table_optimizer,
    )
    return RunConfig(
        task=TaskSpec(args.task, _task_options(args)),
        rounds=args.rounds,
        mode=args.mode,
        seed=args.seed,
        fraction=args.fraction,
        train=train,
        server_optimizer=args.server_optimizer,
        server_lr=args.server_lr,
        table_scale=args.table_scale,
        wire_dtype=args.wire_dtype,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )


class _Progress:
    """Live per-round display (rich) for the simulation."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.rounds = rounds

    def __call__(self, entry: dict) -> None:
        if not self.enabled:
            return
        if entry.get("closing"):
            ms = [m.get("score") for m in entry["metrics"].values() if "score" in m]
            self.console.print(f"[bold]closing evaluation[/]: mean score {np.mean(ms):.4f} over {len(ms)} orgs" if ms else "closing evaluation done")
            return
        up, dense = entry["upload_bytes"], entry["dense_upload_bytes"]
        ratio = f"{dense / up:6.1f}x smaller than dense" if up and dense else ""
        rej = f" [red]{len(entry['rejected'])} refused[/]" if entry["rejected"] else ""
        self.console.print(
            f"round {entry['round']:>3}/{self.rounds}  orgs {entry['clients']:>3}  "
            f"up {up / 2**20:8.3f} MiB {ratio}  down {entry['download_bytes'] / 2**20:8.3f} MiB  "
            f"{entry['wall_seconds']:6.1f} s{rej}"
        )


def _print_final(doc: dict, console) -> None:
    from rich.table import Table

    final = doc["final"]
    names = [k for k in ("score", "val_score", "loss") if k in final.get("mean", {})]
    table = Table(title=f"final metrics — mode {doc['config']['mode']}")
    table.add_column("organisation")
    for n in names:
        table.add_column(n, justify="right")
    for org, m in final.items():
        table.add_row(org, *[f"{m.get(n, float('nan')):.4f}" for n in names], style="bold" if org == "mean" else None)
    console.print(table)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedembed.simulation import simulate

    from fedembed.task import load_task

    cfg = config_from_args(args)
    load_task(cfg.task)  # fail fast on a bad task or options, before the simulation engine starts
    progress = _Progress(cfg.rounds, not args.quiet)
    progress.console.print(
        f"[bold]fedembed[/] simulate: task {cfg.task.name}, {cfg.num_orgs} orgs, {cfg.rounds} rounds, mode {cfg.mode} -> {args.out}"
    )
    runlog = simulate(cfg, args.out, on_round=progress, num_cpus=args.cpus)
    _print_final(runlog.to_dict(), progress.console)
    progress.console.print(f"wrote {args.out}/metrics.json, embeddings.npz, report.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedembed.report import plot_report

    path = Path(args.dir) / "metrics.json"
    if not path.exists():
        raise ConfigError(f"{path} not found: point report at a directory written by 'fedembed simulate'")
    doc = json.loads(path.read_text())
    plot_report(doc, Path(args.dir) / "report.png")
    _print_final(doc, Console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedembed`` command."""
    parser = argparse.ArgumentParser(
        prog="fedembed",
        description="Federated learning of shared embedding tables with private heads, on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    r = sub.add_parser("report", help="redraw report.png and print the final metrics of a run directory")
    r.add_argument("dir", help="directory holding metrics.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedembed`` console script."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    # A user's task module (--task pkg.mod:Class) is found from the current directory, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    try:
        return {"simulate": cmd_simulate, "report": cmd_report}[args.command](args)
    except (ConfigError, TaskError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
