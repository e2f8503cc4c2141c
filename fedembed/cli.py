"""The ``fedembed`` command line: ``simulate``, ``spec``, ``report``, ``server``, ``client``, ``export``, ``certs``.

The run's options are generated from the config dataclasses (:class:`fedembed.config.RunConfig`,
:class:`fedembed.recipe.TrainConfig`): one flag per field, its help the field's docstring.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedembed.aggregate import SERVER_OPTIMIZERS
from fedembed.config import MODES, ROW_SETS, ConfigError, RunConfig
from fedembed.errors import FedembedError
from fedembed.recipe import DP_UNITS, TABLE_OPTIMIZERS, TrainConfig
from fedembed.spec import FederationSpec
from fedembed.task import BUILTIN_TASKS, TaskSpec, parse_options, read_task_config, task_node_config

if TYPE_CHECKING:
    from fedembed.identity import Roster

log = logging.getLogger("fedembed")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not when its help already says it, nor for an empty default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------ options generated from the config dataclasses

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES, "row_set": ROW_SETS, "wire_dtype": ("float16", "float32"),
    "server_optimizer": SERVER_OPTIMIZERS, "table_optimizer": TABLE_OPTIMIZERS,
    "consistency_check": ("auto", "always"), "dp_unit": DP_UNITS,
}


ALIASES: dict[str, tuple[str, ...]] = {"dp_target_epsilon": ("--target-epsilon",), "dp_target_delta": ("--delta",)}
"""Shorter spellings of generated options (issue 13 names the budget ``--target-epsilon``, ``--delta``)."""


def privacy_line(privacy: dict[str, dict[str, float]], limit: int = 8) -> str:
    """Each organisation's (epsilon, delta) after a round, for the progress display.

    Up to ``limit`` organisations by name; more as min / median / max of epsilon.
    """
    if not privacy:
        return ""
    deltas = sorted({float(v.get("delta", 0.0)) for v in privacy.values()})
    head = f"  privacy (epsilon, delta={', '.join(f'{d:g}' for d in deltas)}): "
    if len(privacy) <= limit:
        return head + ", ".join(f"{org} {v['epsilon']:.3f}" for org, v in sorted(privacy.items()))
    eps = sorted(float(v["epsilon"]) for v in privacy.values())
    return head + f"{len(eps)} orgs, min {eps[0]:.3f}, median {float(np.median(eps)):.3f}, max {eps[-1]:.3f}"


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from a numpy-style ``Parameters`` section (``a, b : type`` lines name several)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        i = lines.index("Parameters") + 2
    except ValueError:
        return out
    names: list[str] = []
    while i < len(lines) and not (lines[i] and i + 1 < len(lines) and set(lines[i + 1]) == {"-"}):
        line = lines[i]
        if line and not line.startswith(" "):
            names = [n.strip() for n in line.partition(" : ")[0].split(",")]
            for n in names:
                out[n] = ""
        elif line.strip():
            for n in names:
                out[n] = (out[n] + " " + line.strip()).strip()
        i += 1
    return {k: re.sub(r":\w+:`~?([^`]+)`", r"\1", v).replace("``", "") for k, v in out.items()}


def add_dataclass_options(group: Any, cls: type, names: list[str] | None = None) -> None:
    """One ``--field-name`` option per field of ``cls`` (or those in ``names``): type, default, help from the class.

    Booleans get ``--x/--no-x``; fields with a fixed set of values (:data:`CHOICES`) get
    ``choices``; the help is the field's description in the class docstring.
    """
    docs = field_docs(cls)
    defaults = {f.name: f.default for f in fields(cls)}
    for name in names or [f.name for f in fields(cls)]:
        default = defaults[name]
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"default": default, "help": docs.get(name, "")}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif default is None:
            kw["type"] = _positive_int
        elif isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float):
            kw["type"] = float
        if name in CHOICES:
            kw["choices"] = CHOICES[name]
        group.add_argument(flag, *ALIASES.get(name, ()), **kw)


def _add_task_options(p: argparse.ArgumentParser, simulated: bool) -> None:
    """An organisation's own task: ``--task``, ``--data``, ``--option``, ``--task-config``, ``--device``, ``--threads``."""
    g = p.add_argument_group("the organisation's task" + (" (every simulated organisation's)" if simulated else ""))
    g.add_argument("--task", default="movies" if simulated else None,
                   help=f"{' | '.join(BUILTIN_TASKS)} | package.module:Class | path/to/file.py:Class "
                        "(a subclass of fedembed.Task; see the README's 'Your own model and data')")
    g.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="the organisation's data, given to the task as `data`"
                        + ("; repeat once per organisation to give each its own file" if simulated else ""))
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the task (JSON value or string), e.g. scenario=mixed, rows=20000, dim=16; "
                        "repeatable" + ("; a simulation also gives org and orgs to a task that takes them" if simulated else ""))
    if not simulated:
        g.add_argument("--task-config", type=Path, default=None,
                       help="TOML file with task, data, device and an [options] table (flags given here win)")
    g.add_argument("--device", default=None,
                   help="where local training runs: cpu, cuda, cuda:<n> or auto (default: the task config's, else cpu)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads for local training (default: torch's own choice)")


def _add_run_options(p: argparse.ArgumentParser, server: bool) -> None:
    """The run (recipe, rounds, wire, secure aggregation): generated from RunConfig and TrainConfig."""
    g = p.add_argument_group("run")
    run_fields = ["rounds", *([] if server else ["mode"]), "seed", "fraction", "server_optimizer", "server_lr", "pooled_server_lr",
                  "table_scale"]
    if server:
        run_fields += ["min_orgs", "round_timeout"]
    add_dataclass_options(g, RunConfig, run_fields)
    add_dataclass_options(p.add_argument_group("local training recipe (sent to every organisation)"), TrainConfig)
    add_dataclass_options(p.add_argument_group("wire"), RunConfig, ["wire_dtype", "delta_clip", "max_message_bytes"])
    s = p.add_argument_group("secure aggregation (SecAgg+)")
    add_dataclass_options(s, RunConfig, ["secure", "row_set", "neighbours", "threshold", "secure_ahead", "consistency_check",
                                          "early_unmask"])


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a local multi-organisation simulation on Flower's simulation engine",
        description=(
            "Run organisations and a coordinator on this machine (Flower simulation engine, Ray). Each simulated "
            "organisation loads its own task (--task, with org and orgs when the task takes them); the coordinator "
            "knows only the federation spec derived from organisation 0's model. Writes OUT/metrics.json "
            "(per-round bytes and per-organisation metrics), OUT/embeddings.npz (final shared tables) and "
            "OUT/report.png."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--orgs", type=_positive_int, default=5, help="number of simulated organisations")
    _add_task_options(p, simulated=True)
    _add_run_options(p, server=False)
    p.add_argument("--drop", action="append", default=[], metavar="STAGE[@ROUND]:ORG[,ORG]",
                   help="inject a dropout: organisation ORG vanishes at STAGE (train, share, indicators, "
                        "unmask_indicators, masked, unmask), in every round or only ROUND; repeatable")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory")
    p.add_argument("--cpus", type=_positive_int, default=None, help="CPUs for the simulation engine (default: all)")
    _add_sync_option(p)
    p.add_argument("--quiet", action="store_true", help="no live progress display, no logs below warnings")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, Flower's included")


def _drops(items: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for item in items:
        stage, sep, orgs = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out.setdefault(stage, []).extend(int(o) for o in orgs.split(","))
        except ValueError:
            raise ConfigError(f"--drop takes STAGE[@ROUND]:ORG[,ORG], got {item!r}") from None
    return out


def _dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def config_from_args(args: argparse.Namespace, federation: FederationSpec) -> RunConfig:
    """The :class:`RunConfig` described by ``simulate`` or ``server`` arguments, for ``federation``'s tables."""
    train = TrainConfig(**_dataclass_values(args, TrainConfig))
    run = {k: v for k, v in _dataclass_values(args, RunConfig).items() if k not in ("train", "federation", "drop", "roster")}
    return RunConfig(federation=federation, train=train, drop=_drops(getattr(args, "drop", [])), **run)


def _task_spec(args: argparse.Namespace) -> TaskSpec:
    """The organisation's task from ``--task``/``--data``/``--option`` (and ``--task-config``)."""
    doc = read_task_config(args.task_config) if getattr(args, "task_config", None) else {}
    name = args.task or doc.get("task")
    if not name:
        raise ConfigError("name the organisation's task: --task NAME (or --task-config FILE)")
    options = {**doc.get("options", {}), **parse_options(args.option)}
    data = args.data[-1] if args.data else doc.get("data")
    args.device = args.device or doc.get("device") or "cpu"  # --device, else the task config's, else cpu
    return TaskSpec(name, options, data)


class _Progress:
    """Live per-round display (rich) for the simulation."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True)  # a progress line never wraps, terminal or log file
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
        if entry.get("unchanged"):  # the round's updates were not applied: the user must see it
            self.console.print(f"  [yellow]round {entry['round']}: tables unchanged[/]: {entry['unchanged']}")
        if entry.get("privacy"):  # each organisation's spend so far, as its own ledger reports it
            self.console.print(privacy_line(entry["privacy"]), markup=False)


def _print_final(doc: dict, console) -> None:
    from rich.table import Table

    final = doc["final"]
    # what each organisation serves (its best-validation state, fedembed.stopping) first, then the last round's
    columns = {"best_score": "served", "best_val_score": "its val", "best_round": "round",
               "score": "last", "val_score": "last val", "loss": "last loss"}
    names = [k for k in columns if k in final.get("mean", {})]
    table = Table(title=f"final metrics — mode {doc['config']['mode']}",
                  caption="served: the test score of each organisation's best-validation state (its val score, "
                          "round); last: after the last round")
    table.add_column("organisation")
    for n in names:
        table.add_column(columns[n], justify="right")
    for org, m in final.items():
        cells = [f"{m.get(n, float('nan')):.1f}" if n == "best_round" else f"{m.get(n, float('nan')):.4f}" for n in names]
        table.add_row(org, *cells, style="bold" if org == "mean" else None)
    console.print(table)


def _simulated(args: argparse.Namespace) -> tuple[list[TaskSpec], list[str], FederationSpec]:
    """The simulated organisations' own tasks, names and the federation spec they share."""
    from fedembed.task import check_tasks, simulated_federation

    base = _task_spec(args)
    if "seed" not in base.options:  # a simulation's --seed also seeds its organisations' tasks (data splits, heads)
        base = TaskSpec(base.name, {"seed": args.seed, **base.options}, base.data)
    if len(args.data) not in (0, 1, args.orgs):
        raise ConfigError(f"--data: give one path for every organisation or one per organisation ({args.orgs}), "
                          f"got {len(args.data)}")
    per_org = args.data if len(args.data) == args.orgs and args.orgs > 1 else None
    specs, names, federation = simulated_federation(base, args.orgs, per_org)
    check_tasks(specs, names)  # one loss and one evaluation each: a broken task is named before the engine starts
    return specs, names, federation


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedembed.simulation import simulate

    tasks, names, federation = _simulated(args)  # fails fast on a bad task, before the simulation engine starts
    cfg = config_from_args(args, federation)
    progress = _Progress(cfg.rounds, not args.quiet)
    progress.console.print(
        f"[bold]fedembed[/] simulate: task {tasks[0].name}, {len(tasks)} orgs, {cfg.rounds} rounds, mode {cfg.mode}"
        f" -> {args.out}"
    )
    runlog = simulate(cfg, tasks, args.out, on_round=progress, num_cpus=args.cpus, names=names,
                      device=args.device, threads=args.threads, quiet=args.quiet, sync=args.sync)
    _print_final(runlog.to_dict(), progress.console)
    progress.console.print(f"wrote {args.out}/metrics.json, embeddings.npz, report.png")
    return 0


def _add_spec(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spec",
        help="write the federation spec (shared tables, vocabularies) that fits a task's model",
        description=(
            "Load a task as an organisation would and write the federation spec its model fits: every shared "
            "table's rows, dimension and vocabulary digest (JSON), and each table's vocabulary file beside it. "
            "The coordinator is started with it (fedembed server --federation FILE); every organisation checks "
            "its own model against it when it joins."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_task_options(p, simulated=False)
    p.add_argument("--out", type=Path, default=Path("federation.json"), help="spec file to write")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def cmd_spec(args: argparse.Namespace) -> int:
    from fedembed.task import load_task

    task = load_task(_task_spec(args))
    federation = task.federation_spec()
    federation.write(args.out)
    for name, vocab in task.vocabularies().items():
        if vocab.kind == "file":
            path = vocab.write(args.out.parent / f"{name}.vocab.txt")
            print(f"wrote {path} ({vocab.size} ids + 1 out-of-vocabulary row, {vocab.digest})")
    for name, t in federation.tables.items():
        print(f"table {name}: {t.describe()}")
    print(f"wrote {args.out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="an organisation's trained model (final shared tables + its private head) as a torch state dict",
        description=(
            "From an organisation's state directory and its own task, write OUT: the state dict of the task's plain "
            "torch module (the one wrapped in SplitModel) with the final shared tables and this organisation's head, "
            "ready for `module.load_state_dict(torch.load(OUT))`. With --coordinator DIR instead, write the "
            "coordinator's final tables (OUT as .npz) and, with --federation, each table's vocabulary file beside it."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--state-dir", type=Path, default=None, help="the organisation's state directory")
    p.add_argument("--coordinator", type=Path, default=None, help="the coordinator's --state-dir (or a simulation's OUT)")
    p.add_argument("--federation", type=Path, default=None, help="the federation spec file (for the vocabularies)")
    _add_task_options(p, simulated=False)
    p.add_argument("--out", type=Path, required=True, help="file to write (model.pt, or tables.npz)")
    p.add_argument("--best", action="store_true",
                   help="the state the organisation served (its best-validation evaluation) instead of its last: "
                        "kept in STATE_DIR/best by `fedembed client --keep-best-state` (or the run's --keep-best-state)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def cmd_export(args: argparse.Namespace) -> int:
    from fedembed.export import export_coordinator, export_organisation

    if (args.state_dir is None) == (args.coordinator is None):
        raise ConfigError("export needs either --state-dir (an organisation's model) or --coordinator (the tables)")
    if args.coordinator is not None:
        federation = FederationSpec.load(args.federation) if args.federation else None
        written = export_coordinator(args.coordinator, args.out, federation, args.federation)
    else:
        written = export_organisation(args.state_dir, _task_spec(args), args.out, device=args.device, best=args.best)
    for path in written:
        print(f"wrote {path}")
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


def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="run the coordinator: a Flower SuperLink and the fedembed run on it",
        description=(
            "Start the coordinator (Flower SuperLink, TLS and SuperNode authentication on by default) and run "
            "the federated rounds once enough organisations have joined. Writes STATE_DIR/metrics.json, "
            "embeddings.npz and report.png; checkpoints every round in STATE_DIR/coordinator, so starting "
            "again with the same --state-dir continues from the last finished round. The coordinator knows only "
            "the federation spec (--federation, written by `fedembed spec`): it loads no data and no task code. "
            "Any option can also "
            "come from --config FILE.toml (keys = option names, e.g. rounds = 10, auth-key = [\"org-0.pub\"]); "
            "flags given on the command line win."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="TOML file with any of these options")
    p.add_argument("--federation", type=Path, default=None,
                   help="the federation spec: shared tables, their shapes and vocabularies (TOML or JSON; "
                        "`fedembed spec` writes one); required")
    _add_run_options(p, server=True)
    c = p.add_argument_group("coordinator")
    c.add_argument("--start-orgs", type=int, default=None,
                   help="start the rounds once this many organisations are online (default: --min-orgs)")
    c.add_argument("--state-dir", type=Path, default=Path("runs/server"),
                   help="checkpoints, outputs, logs; reuse it to resume")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    n.add_argument("--port", type=int, default=9092, help="public port: Flower's Fleet API only (the SuperLink's Control and Runtime APIs stay on 127.0.0.1)")
    n.add_argument("--certfile", type=Path, default=None, help="TLS certificate of the coordinator (PEM)")
    n.add_argument("--keyfile", type=Path, default=None, help="its private key (PEM)")
    n.add_argument("--ca-certfile", type=Path, default=None, help="CA certificate that signed it (PEM)")
    n.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (loopback trials only)")
    n.add_argument("--auth-key", action="append", default=[], type=Path, metavar="PUB",
                   help="public key (OpenSSH) of an organisation allowed to join, or a directory of *.pub; repeatable")
    n.add_argument("--roster", type=Path, default=None,
                   help="the federation's organisations: directory of <name>.pub files or a JSON file name -> "
                        "public key; replies are attributed by these keys' signatures (default: the --auth-key "
                        "keys, named by file name)")
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client",
        help="run an organisation: a Flower SuperNode pointed at the coordinator",
        description=(
            "Run one organisation as a Flower SuperNode. It trains its own task on its own data (--task, --data, "
            "--option, or --task-config FILE), loaded here and never named by the coordinator; on joining it checks "
            "its model's shared tables against the federation's and refuses a mismatch. Its private head, "
            "optimizer state, table cache and session secrets stay in STATE_DIR; every reply is signed with its "
            "identity key, and secure aggregation checks the other organisations against its own ROSTER. The stock "
            "command `flower-supernode --superlink HOST:PORT --root-certificates CA --auth-supernode-private-key KEY "
            "--node-config 'state-dir=\"DIR\" identity-key=\"KEY\" roster=\"ROSTER\" task=\"TASK\" data=\"FILE\"'` "
            "does the same, slower (give each SuperNode on one machine its own --port); this wrapper also keeps the "
            "organisation's task loaded in a worker and restarts the SuperNode while the coordinator is away."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--superlink", default="127.0.0.1:9092", help="coordinator address HOST:PORT")
    p.add_argument("--state-dir", type=Path, required=True, help="this organisation's private state directory")
    _add_task_options(p, simulated=False)
    p.add_argument("--root-cert", type=Path, default=None, help="CA certificate that signed the coordinator's")
    p.add_argument("--auth-key", type=Path, default=None, help="this organisation's private key (OpenSSH EC)")
    p.add_argument("--identity-key", type=Path, default=None,
                   help="private key that signs this organisation's replies (default: --auth-key); its public half "
                        "must be in the roster")
    p.add_argument("--roster", type=Path, required=True,
                   help="the federation's roster as this organisation holds it: directory of <name>.pub files or "
                        "JSON; the other organisations' signatures are checked against it, never against keys "
                        "the coordinator sends")
    p.add_argument("--secure-colluders", type=int, default=0,
                   help="organisations that may collude with the coordinator: secure rounds need a consistency "
                        "statement signed by more than half of (roster + this many)")
    p.add_argument("--dp-min-noise-multiplier", type=float, default=0.0,
                   help="this organisation's DP floor: a recipe whose noise multiplier is smaller is refused before "
                        "anything trains (record-level DP: the gradient's and the row selection's noise as one, as "
                        "its ledger charges them; default: 0, training without DP accepted)")
    p.add_argument("--dp-max-epsilon", type=float, default=0.0,
                   help="this organisation's own privacy budget (epsilon at --dp-delta); the tighter of it and the "
                        "recipe's applies; once spent it evaluates and trains no more (default: 0, the recipe's)")
    p.add_argument("--dp-delta", type=float, default=0.0,
                   help="the delta of --dp-max-epsilon (default: 0, the recipe's dp_target_delta)")
    p.add_argument("--keep-best-state", action="store_true",
                   help="keep a copy of the state this organisation serves (its best-validation evaluation's head "
                        "and tables, a full table write at each improvement) in STATE_DIR/best, for "
                        "`fedembed export --best`; its own choice, whatever the run's recipe says")
    p.add_argument("--no-normaliser-upload", action="store_true",
                   help="never upload this organisation's Adam normaliser of the rows it touched (the pooled "
                        "normaliser, on by default for tables of at most 1,000 rows): a training plan that asks "
                        "for it is refused, naming the tables")
    p.add_argument("--secure-row-sets", default="dense,union,revealed",
                   help="secure row-set modes this organisation takes part in (revealed tells the coordinator "
                        "its row ids); plain rounds are --require-secure's")
    p.add_argument("--max-runs", type=int, default=0,
                   help="answer at most this many runs (run keys) from this state directory (0: no limit): each run "
                        "is another series of updates and evaluations of this organisation's data, and the run key "
                        "is the coordinator's to choose")
    p.add_argument("--max-epochs", type=float, default=10.0,
                   help="refuse a recipe asking more local or head re-fit epochs per round than this (the recipe is "
                        "the coordinator's; this bounds the work one message can ask)")
    p.add_argument("--max-cooc-negatives", type=int, default=256,
                   help="refuse a recipe asking more co-occurrence negatives than this (memory grows with it)")
    p.add_argument("--max-batch-size", type=int, default=65536, help="refuse a recipe asking a larger batch than this")
    p.add_argument("--require-secure", action="store_true",
                   help="take part in secure rounds only: refuse a plain round, which sends the update (row ids, "
                        "deltas, weights) in the clear. Without it, a plain round is still refused once this "
                        "organisation has contributed to a secure sum, in any run (a coordinator downgrading it)")
    _add_sync_option(p)
    p.add_argument("--sync-pad", type=float, default=4.0,
                   help="--sync padded (auto in plain/revealed rounds): each row it uses that its uploads never showed "
                        "is asked for among pad-1 times as many secret-keyed decoys")
    p.add_argument("--insecure", action="store_true", help="no TLS (only against an --insecure coordinator)")
    p.add_argument("--runtime-port", type=int, default=None,
                   help="port of the SuperNode's local Runtime API on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-restart", action="store_true", help="exit when the SuperNode exits, do not restart it")
    p.add_argument("--no-worker", action="store_true",
                   help="no long-lived organisation worker: a flwr-clientapp process per message, each loading "
                        "torch and the task (slower; what a stock flower-supernode does)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_sync_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sync", choices=("auto", "full", "working-set", "padded"), default="auto",
                   help="which table rows the organisation asks to be synced (its own policy, never the coordinator's): "
                        "full (every changed row; reveals nothing), padded (the rows its uploads showed, plus every "
                        "other row it uses hidden among secret-keyed decoys, --sync-pad), working-set (only the rows "
                        "its data looks up; the coordinator learns them all, held-out-only ones included); "
                        "auto: full in secure union/dense rounds, padded otherwise")


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs",
        help="write a test CA, a server certificate and organisation key pairs",
        description=(
            "Write DIR/ca.crt, ca.key, server.crt, server.key (valid for localhost, 127.0.0.1 and every --host) "
            "and DIR/org-<i>.key / org-<i>.pub (SuperNode authentication, EC P-384, OpenSSH). For trials: in "
            "production each organisation makes its own key pair and sends only the .pub file."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("dir", type=Path, help="output directory")
    p.add_argument("--orgs", type=int, default=3, help="organisation key pairs to write")
    p.add_argument("--host", action="append", default=[], help="extra host name or IP of the coordinator; repeatable")
    p.add_argument("--days", type=_positive_int, default=365, help="validity of the certificates")


def _auth_keys(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(p.glob("*.pub"))
        else:
            out.append(p)
    return out


def _roster(path: Path | None, auth_keys: list[Path]) -> Roster:
    """The coordinator's roster: ``--roster``, else the ``--auth-key`` public keys named by file name."""
    from fedembed.identity import IdentityError, Roster

    try:
        if path is not None:
            return Roster.load(path)
        if not auth_keys:
            raise ConfigError("no roster: pass --roster (directory of <name>.pub or JSON) or the --auth-key keys")
        return Roster({p.stem: Roster.load_key(p) for p in auth_keys})
    except IdentityError as exc:
        raise ConfigError(str(exc)) from exc


def _with_config_file(argv: list[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse ``server`` arguments with the TOML file's values as defaults."""
    import tomllib

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"--config {path} not found")
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    parser = build_parser()
    server = parser._subparsers._group_actions[0].choices["server"]  # noqa: SLF001 - argparse has no public accessor
    known = {a.dest for a in server._actions}  # noqa: SLF001
    defaults = {}
    for key, value in doc.items():
        dest = key.replace("-", "_")
        if dest not in known or dest == "config":
            raise ConfigError(f"{path}: unknown setting {key!r}; see `fedembed server --help`")
        defaults[dest] = [Path(v) for v in value] if dest == "auth_key" else Path(value) if dest in ("roster", "federation") else value
    server.set_defaults(**defaults)
    return parser.parse_args(argv)


class _DeployProgress(_Progress):
    """Progress of a deployed run, from the ServerApp's progress events."""

    def __call__(self, event: dict) -> None:
        if event.get("event") == "waiting":
            if self.enabled:
                self.console.print(f"organisations online: {event['online']}/{event['wanted']}")
            return
        if event.get("event") == "start":
            if self.enabled and event["round"] > 1:
                self.console.print(f"ServerApp resumed at round {event['round']} "
                                   f"(tables sha256 {event['tables_sha256'][:12]})")
            for change in event.get("recipe_changes", []):  # shown even with --quiet: the run's recipe changed
                log.warning("resumed with a recipe that differs from the checkpoint's: %s (from this round on; pass "
                            "the old value to keep it)", change)
            return
        if event.get("event") == "done":
            if self.enabled:
                self.console.print("[bold]run finished[/]")
            return
        if event.get("event") == "round" and event.get("rejected") and self.enabled:
            for org, why in event["rejected"].items():
                self.console.print(f"  [red]round {event['round']}: left out {org}[/]: {why}")
        super().__call__(event)


def cmd_server(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from fedembed.deploy import ServerOptions, resume_round, run_outcome, run_server

    if args.config is not None:
        args = _with_config_file(argv, args)
    if args.federation is None:
        raise ConfigError("the coordinator needs the federation spec: --federation FILE (write one with `fedembed spec`)")
    cfg = config_from_args(args, FederationSpec.load(args.federation))
    done = resume_round(Path(args.state_dir).resolve())  # fail fast on a state dir that cannot be resumed
    cfg = cfg.with_roster(_roster(args.roster, _auth_keys(args.auth_key)).to_dict())
    opts = ServerOptions(
        state_dir=args.state_dir, host=args.host, port=args.port, certfile=args.certfile, keyfile=args.keyfile,
        ca_certfile=args.ca_certfile, insecure=args.insecure, auth_keys=_auth_keys(args.auth_key),
        max_reply_bytes=cfg.max_message_bytes,
    )
    progress = _DeployProgress(cfg.rounds, not args.quiet)
    scheme = "http" if opts.insecure else "https"
    progress.console.print(
        f"[bold]fedembed[/] server: tables {', '.join(f'{n} {t.rows}x{t.dim}' for n, t in cfg.federation.tables.items())}, "
        f"{len(cfg.roster)} orgs in the roster, {cfg.rounds} rounds, mode {cfg.mode}"
        f"{', secure' if cfg.secure else ''} on {scheme}://{opts.host}:{opts.port}, "
        + ("[red]INSECURE: no TLS, any SuperNode may join[/]" if opts.insecure else f"{len(opts.auth_keys)} authorised org keys")
        + f" -> {opts.state_dir}"
        + (f"\nresuming after round {done}" if done else "")
    )
    start_orgs = args.start_orgs if args.start_orgs is not None else cfg.min_orgs
    result = run_server(cfg, opts, on_event=progress, start_orgs=start_orgs)
    completed, reason = run_outcome(result)
    if completed:
        if result["status"] != "finished:completed":
            log.warning("the run wrote its outputs; Flower's last status was %s %s", result["status"], result["details"])
        doc = json.loads((opts.state_dir / "metrics.json").read_text())
        _print_final(doc, progress.console)
        progress.console.print(f"wrote {opts.state_dir}/metrics.json, embeddings.npz, report.png")
        return 0
    log.error("%s (SuperLink log: %s)", reason, opts.state_dir / "superlink.log")
    return 1


def client_rules(args: argparse.Namespace) -> dict[str, str]:
    """The organisation's own rules from ``fedembed client`` arguments, as node config entries (values as written)."""
    return {"secure-colluders": str(args.secure_colluders),
            "secure-row-sets": json.dumps(args.secure_row_sets),
            "secure-required": "true" if args.require_secure else "false",
            "max-runs": str(args.max_runs), "max-epochs": repr(float(args.max_epochs)),
            "max-cooc-negatives": str(args.max_cooc_negatives), "max-batch-size": str(args.max_batch_size),
            "dp-min-noise-multiplier": str(args.dp_min_noise_multiplier),
            "dp-max-epsilon": str(args.dp_max_epsilon), "dp-delta": str(args.dp_delta),
            "sync": json.dumps(args.sync), "sync-pad": repr(float(args.sync_pad)),
            "normaliser-upload": "false" if args.no_normaliser_upload else "true",
            "keep-best-state": "true" if args.keep_best_state else "false"}


def cmd_client(args: argparse.Namespace) -> int:
    from fedembed.deploy import ClientOptions, run_client

    spec = _task_spec(args)
    if args.no_worker:  # the worker loads the task at start; without it, fail here rather than at the first message
        from fedembed.task import check_task, load_task, resolve_device

        resolve_device(args.device)
        task = load_task(spec)
        task.table_specs()
        check_task(task)
    task_config = task_node_config(spec, args.device, args.threads)
    opts = ClientOptions(
        superlink=args.superlink, state_dir=args.state_dir, root_cert=args.root_cert,
        auth_key=args.auth_key, insecure=args.insecure, runtime_port=args.runtime_port, restart=not args.no_restart,
        identity_key=args.identity_key, roster=args.roster, worker=not args.no_worker, task_config=task_config,
        extra_node_config=client_rules(args),
    )
    if opts.insecure:
        log.warning("--insecure: this organisation's traffic to the coordinator is not encrypted")
    return run_client(opts)


def cmd_certs(args: argparse.Namespace) -> int:
    from fedembed.certs import write_test_certs

    paths = write_test_certs(args.dir, args.orgs, hosts=args.host, days=args.days)
    print(f"wrote {paths.ca_cert}, {paths.server_cert}, {paths.server_key} and {args.orgs} org key pairs "
          f"({args.dir}/org-<i>.key, org-<i>.pub) to {args.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedembed`` command."""
    parser = argparse.ArgumentParser(
        prog="fedembed",
        description="Federated learning of shared embedding tables with private heads, on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_spec(sub)
    r = sub.add_parser("report", help="redraw report.png and print the final metrics of a run directory")
    r.add_argument("dir", help="directory holding metrics.json")
    _add_server(sub)
    _add_client(sub)
    _add_export(sub)
    _add_certs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedembed`` console script."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_logs = args.command == "simulate" and args.quiet  # server --quiet hides the progress display only
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet_logs else logging.INFO)
    # A user's task module (--task pkg.mod:Class) is found from the current directory, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    try:
        if args.command == "server":
            return cmd_server(args, argv)
        commands = {"simulate": cmd_simulate, "report": cmd_report, "client": cmd_client, "certs": cmd_certs,
                    "spec": cmd_spec, "export": cmd_export}
        return commands[args.command](args)
    except (FedembedError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
