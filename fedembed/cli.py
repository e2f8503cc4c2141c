"""The ``fedembed`` command line: ``simulate``, ``report``, ``server``, ``client``, ``certs``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedembed.config import MODES, ROW_SETS, ConfigError, RunConfig
from fedembed.task import BUILTIN_TASKS, TaskError, TaskSpec
from fedembed.train import TABLE_OPTIMIZERS, TrainConfig

if TYPE_CHECKING:
    from fedembed.identity import Roster

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
    _add_run_options(p)
    _add_secure_options(p)
    p.add_argument("--drop", action="append", default=[], metavar="STAGE[@ROUND]:ORG[,ORG]",
                   help="inject a dropout: organisation ORG vanishes at STAGE (train, share, indicators, "
                        "unmask_indicators, masked, unmask), in every round or only ROUND; repeatable")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation engine (default: all)")
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, Flower's included")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options that define a run (task, recipe, wire): shared by ``simulate`` and ``server``."""
    p.add_argument("--task", default="movies", help=f"{' | '.join(BUILTIN_TASKS)} | package.module:TaskClass")
    p.add_argument("--orgs", type=_positive_int, default=5, help="number of organisations")
    p.add_argument("--rounds", type=_positive_int, default=10, help="federated rounds")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, tables and shuffling")
    p.add_argument("--mode", choices=MODES, default="fedembed",
                   help="fedembed: shared tables + private heads; local: no federation; "
                        "fedavg-all: heads averaged too; pooled: centralised upper bound")
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
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="local mini-batch size")
    t.add_argument("--table-lr", type=float, default=d.table_lr, help="local learning rate of the shared tables")
    t.add_argument("--head-lr", type=float, default=d.head_lr, help="local learning rate of the private head")
    t.add_argument("--table-optimizer", choices=TABLE_OPTIMIZERS, default=d.table_optimizer)
    t.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="local learning rates are multiplied by this every round (1: constant)")
    t.add_argument("--keep-table-state", action=argparse.BooleanOptionalAction, default=d.keep_table_state,
                   help="keep the local table optimizer's state of touched rows across rounds (private)")
    t.add_argument("--head-weight-decay", type=float, default=d.head_weight_decay, help="AdamW weight decay of the head")
    t.add_argument("--max-row-weight", type=float, default=d.max_row_weight,
                   help="cap of a row's weight (its lookup count) in the per-row weighted mean")
    t.add_argument("--cooc-weight", type=float, default=d.cooc_weight,
                   help="weight of the shared co-occurrence objective (0: off; measured not to help on movies)")
    t.add_argument("--residual", action=argparse.BooleanOptionalAction, default=d.residual,
                   help="a private per-organisation residual on every shared table (never uploaded)")
    t.add_argument("--guard", action=argparse.BooleanOptionalAction, default=d.guard,
                   help="each organisation also trains a private local twin and serves, by its own validation "
                        "score, the shared model, the twin or their blend (fedembed mode; doubles local training)")
    t.add_argument("--guard-blend", action=argparse.BooleanOptionalAction, default=d.guard_blend,
                   help="let the guard serve the mean of the shared model's and the twin's outputs")
    t.add_argument("--server-optimizer", choices=["sgd", "adagrad"], default="sgd")
    t.add_argument("--server-lr", type=float, default=1.0)
    t.add_argument("--table-scale", type=float, default=0.1, help="std of the seeded version-0 tables")
    t.add_argument("--fraction", type=float, default=1.0, help="share of organisations sampled per round")
    w = p.add_argument_group("wire")
    w.add_argument("--wire-dtype", choices=["float16", "float32"], default="float16", help="dtype of uploaded deltas")
    w.add_argument("--delta-clip", type=float, default=4.0,
                   help="largest |delta| of one table entry the aggregate takes as is (larger ones are clipped); "
                        "sets the fixed-point scale both plain and secure aggregation sum in")
    w.add_argument("--max-message-mb", type=float, default=512.0, help="replies larger than this are refused")


def _add_secure_options(p: argparse.ArgumentParser) -> None:
    """Secure aggregation options: shared by ``simulate`` and ``server``."""
    s = p.add_argument_group("secure aggregation (SecAgg+)")
    s.add_argument("--secure", action=argparse.BooleanOptionalAction, default=False,
                   help="the coordinator learns only the sum of the organisations' table updates")
    s.add_argument("--row-set", choices=ROW_SETS, default="union",
                   help="rows the masked vectors cover: dense = all rows (reveals nothing more); union = rows "
                        "anyone touched, found by a secure count (reveals how many orgs touched each row, not "
                        "who); revealed = each org tells its own row ids (values stay masked)")
    s.add_argument("--neighbours", type=_positive_int, default=None,
                   help="SecAgg+ neighbourhood size k (default: everyone up to 10 orgs, then 2*ceil(log2 n)+2)")
    s.add_argument("--threshold", type=_positive_int, default=None,
                   help="Shamir threshold t of the k+1 share holders (neighbours and self; default (k+1)//2+1); "
                        "a round survives up to k+1-t dropouts per neighbourhood")


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
        lr_decay=args.lr_decay,
        keep_table_state=args.keep_table_state,
        head_weight_decay=args.head_weight_decay,
        max_row_weight=args.max_row_weight,
        cooc_weight=args.cooc_weight,
        residual=args.residual,
        guard=args.guard,
        guard_blend=args.guard_blend,
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
        drop=_drops(getattr(args, "drop", [])),
        delta_clip=args.delta_clip,
        **{k: getattr(args, k) for k in _SERVER_RUN_SETTINGS if getattr(args, k, None) is not None},
    )


# RunConfig fields set by `fedembed server` flags (absent from `simulate`'s namespace)
_SERVER_RUN_SETTINGS = ("min_orgs", "round_timeout", "secure", "row_set", "neighbours", "threshold")


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


def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="run the coordinator: a Flower SuperLink and the fedembed run on it",
        description=(
            "Start the coordinator (Flower SuperLink, TLS and SuperNode authentication on by default) and run "
            "the federated rounds once enough organisations have joined. Writes STATE_DIR/metrics.json, "
            "embeddings.npz and report.png; checkpoints every round in STATE_DIR/coordinator, so starting "
            "again with the same --state-dir continues from the last finished round. Any option can also "
            "come from --config FILE.toml (keys = option names, e.g. rounds = 10, auth-key = [\"org-0.pub\"]); "
            "flags given on the command line win."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="TOML file with any of these options")
    _add_run_options(p)
    _add_secure_options(p)
    c = p.add_argument_group("coordinator")
    c.add_argument("--min-orgs", type=_positive_int, default=1,
                   help="organisations a round waits for (and needs replies from)")
    c.add_argument("--start-orgs", type=int, default=None,
                   help="start the rounds once this many organisations are online (default: --min-orgs)")
    c.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for replies; late or dead organisations are left out")
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
            "Run one organisation as a Flower SuperNode with node config 'org=ORG state-dir=STATE_DIR "
            "identity-key=KEY roster=ROSTER'. Its private head, optimizer state, table cache and session "
            "secrets stay in STATE_DIR; every reply is signed with its identity key, and secure aggregation "
            "checks the other organisations against its own ROSTER. The stock command `flower-supernode "
            "--superlink HOST:PORT --root-certificates CA --auth-supernode-private-key KEY --node-config "
            "'org=0 state-dir=\"DIR\" identity-key=\"KEY\" roster=\"ROSTER\"'` does the same (give each SuperNode "
            "on one machine its own --port); this wrapper also restarts it while the coordinator is away."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--superlink", default="127.0.0.1:9092", help="coordinator address HOST:PORT")
    p.add_argument("--org", type=int, required=True, help="this organisation's index in the task (0-based)")
    p.add_argument("--state-dir", type=Path, required=True, help="this organisation's private state directory")
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
    p.add_argument("--secure-row-sets", default="dense,union,revealed",
                   help="secure row-set modes this organisation takes part in (revealed tells the coordinator "
                        "its row ids)")
    p.add_argument("--insecure", action="store_true", help="no TLS (only against an --insecure coordinator)")
    p.add_argument("--runtime-port", type=int, default=None,
                   help="port of the SuperNode's local Runtime API on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-restart", action="store_true", help="exit when the SuperNode exits, do not restart it")
    p.add_argument("--no-worker", action="store_true",
                   help="no long-lived organisation worker: every message loads torch and the task in its own "
                        "ClientApp process (slower; what a stock flower-supernode does)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs",
        help="write a test CA, a server certificate and organisation key pairs",
        description=(
            "Write DIR/ca.crt, ca.key, server.crt, server.key (valid for localhost, 127.0.0.1 and every --host) "
            "and DIR/org-<i>.key / org-<i>.pub (SuperNode authentication, EC P-384, OpenSSH). For trials: in "
            "production each organisation makes its own key pair and sends only the .pub file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        defaults[dest] = [Path(v) for v in value] if dest == "auth_key" else Path(value) if dest == "roster" else value
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
    from fedembed.task import load_task

    if args.config is not None:
        args = _with_config_file(argv, args)
    cfg = config_from_args(args)
    load_task(cfg.task)  # fail fast on a bad task
    done = resume_round(Path(args.state_dir).resolve())  # fail fast on a state dir that cannot be resumed
    cfg = cfg.with_roster(_roster(args.roster, _auth_keys(args.auth_key)).to_dict())
    opts = ServerOptions(
        state_dir=args.state_dir, host=args.host, port=args.port, certfile=args.certfile, keyfile=args.keyfile,
        ca_certfile=args.ca_certfile, insecure=args.insecure, auth_keys=_auth_keys(args.auth_key),
    )
    progress = _DeployProgress(cfg.rounds, not args.quiet)
    scheme = "http" if opts.insecure else "https"
    progress.console.print(
        f"[bold]fedembed[/] server: task {cfg.task.name}, {cfg.num_orgs} orgs, {cfg.rounds} rounds, mode {cfg.mode}"
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


def cmd_client(args: argparse.Namespace) -> int:
    from fedembed.deploy import ClientOptions, run_client

    opts = ClientOptions(
        superlink=args.superlink, org=args.org, state_dir=args.state_dir, root_cert=args.root_cert,
        auth_key=args.auth_key, insecure=args.insecure, runtime_port=args.runtime_port, restart=not args.no_restart,
        identity_key=args.identity_key, roster=args.roster, worker=not args.no_worker,
        extra_node_config={"secure-colluders": str(args.secure_colluders),
                           "secure-row-sets": json.dumps(args.secure_row_sets)},
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
    r = sub.add_parser("report", help="redraw report.png and print the final metrics of a run directory")
    r.add_argument("dir", help="directory holding metrics.json")
    _add_server(sub)
    _add_client(sub)
    _add_certs(sub)
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
        if args.command == "server":
            return cmd_server(args, argv)
        commands = {"simulate": cmd_simulate, "report": cmd_report, "client": cmd_client, "certs": cmd_certs}
        return commands[args.command](args)
    except (ConfigError, TaskError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
