"""The coordinator's rounds, over an abstract message transport.

:class:`Coordinator` is everything the ServerApp does, minus Flower: it samples
organisations, sends each the plan and the rows changed since the version it last saw,
validates replies (a bad one is refused with a message naming the organisation, the round
goes on), aggregates per row, steps the server optimizer, stamps versions, checkpoints
atomically, and keeps the run log. :mod:`fedembed.apps.server` gives it a :class:`Transport` over a
Flower ``Grid``; tests may give it any other.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedembed.aggregate import ServerOptimizer
from fedembed.config import MAX_KEPT_SHARE, ConfigError, RoundPlan, RunConfig
from fedembed.errors import FedembedError
from fedembed.identity import SIG_RECORD, IdentityError, Roster, verify_reply
from fedembed.normaliser import check_upload, narrow, upload_shapes
from fedembed.report import RunLog
from fedembed.secagg.vector import ValueScales, fixed_point_sum
from fedembed.sparse import RowUpdate, UpdateError
from fedembed.stopping import stalled
from fedembed.store import Checkpoint, load_latest_checkpoint, save_checkpoint
from fedembed.tables import RowRequest, VersionedTables, request_digest
from fedembed.wire import (
    decode_request, decode_request_digest, decode_update, dense_upload_bytes, encode_sync, record_bytes,
)

if TYPE_CHECKING:
    from fedembed.secagg.server import SecurePipeline

log = logging.getLogger(__name__)

#: How a run ran before a recipe field existed, for the fields whose default is not that:
#: a checkpoint written by such a version lacks the field (:meth:`Coordinator._resume` says so,
#: with ``--<field> <value>``, the flag that keeps it). Each maps to the value the older version
#: ran as, read from the checkpoint's run: no pooled normaliser; every table stepped by its
#: ``server_lr``.
BEFORE_FIELD: dict[str, Callable[[dict[str, Any]], object]] = {
    "pooled_normaliser_rows": lambda run: 0,
    "pooled_server_lr": lambda run: run.get("server_lr", 1.0),
}
#: The coordinator's own part of the recipe: how it steps the tables with each round's sum.
SERVER_STEP = ("server_optimizer", "server_lr", "pooled_server_lr")

TRAIN = "train"
#: Per-request sync records of one version hold at most this many tables' worth of rows together.
REQUEST_RECORD_TABLES = 4.0
EVALUATE = "evaluate"


@dataclass
class Reply:
    """A reply from one node: its content, or the error that came instead."""

    node: int
    content: RecordDict | None
    error: str | None = None


class Transport(Protocol):
    """How the coordinator reaches organisations (a Flower Grid in production)."""

    def node_ids(self, minimum: int, timeout: float) -> list[int]:
        """Connected nodes, waiting up to ``timeout`` s for at least ``minimum``."""
        ...

    def exchange(self, message_type: str, contents: dict[int, RecordDict], timeout: float) -> list[Reply]:
        """Send one message per node and collect the replies that arrive in time."""
        ...

    def exchange_iter(self, message_type: str, contents: dict[int, RecordDict], timeout: float) -> Iterator[Reply]:
        """Like :meth:`exchange`, yielding each reply as it arrives (a missing node last, with an error)."""
        ...


def applied(entry: dict) -> bool:
    """Whether a round's log entry changed the tables (usable updates, not abandoned, at least ``--min-orgs``)."""
    return entry.get("clients", 0) > 0 and "abandoned" not in entry and "unchanged" not in entry


class RunFailed(FedembedError, RuntimeError):
    """A strict run (a simulation) stopped because an organisation failed instead of replying."""


class Coordinator:
    """Runs the rounds of one federated run.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    transport : Transport
        Message exchange with organisations.
    state_dir : Path or None
        Where checkpoints go (and are resumed from); None keeps everything in memory.
    on_round : callable, optional
        Called with each finished round's log entry (progress display).
    roster : Roster, optional
        The federation's organisations; default ``cfg.roster``, else the transport's
        ``roster`` attribute (an in-process transport that made the keys). Replies are
        attributed by these keys only.
    wait_for : int
        Organisations that must be connected before every round (a simulation: all of
        them, so no round runs with whoever happened to start first); fewer after
        ``round_timeout`` fail the run. 0: wait for ``cfg.min_orgs`` only.
    strict : bool
        A simulation with no injected dropouts: an organisation that fails instead of
        replying (its task raised, its process died) fails the run with
        :class:`RunFailed`, naming it and its error, rather than the round going on
        without it. A deployment tolerates failures down to ``cfg.min_orgs``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        transport: Transport,
        state_dir: Path | None = None,
        on_round: Callable[[dict], None] | None = None,
        roster: Roster | None = None,
        wait_for: int = 0,
        strict: bool = False,
    ) -> None:
        if cfg.mode != "fedembed":
            raise ConfigError(
                f"mode {cfg.mode!r} is a baseline that runs in one process (fedembed simulate --mode {cfg.mode}, "
                "fedembed.baselines); a coordinator runs fedembed"
            )
        self.cfg = cfg
        self.wait_for = int(wait_for)
        self.strict = bool(strict)
        self.transport = transport
        self.state_dir = Path(state_dir) if state_dir else None
        self.on_round = on_round
        self.shapes = cfg.federation.shapes()
        self.pooled = cfg.train.pooled_tables(self.shapes)  # tables whose uploads carry the pooled normaliser
        if self.pooled:
            log.info("table(s) %s carry the pooled normaliser (%s): uploads of them are twice as wide", sorted(self.pooled),
                     "--pooled-normaliser" if cfg.train.pooled_normaliser
                     else f"at most {cfg.train.pooled_normaliser_rows} rows; --pooled-normaliser-rows 0 for none")
        elif small := cfg.train.small_tables(self.shapes):  # the rule would apply, but not with this optimizer or DP
            log.info("table(s) %s are small enough for the pooled normaliser but carry none: it needs the "
                     "sparse_adam table optimizer and no DP, got %s", sorted(small), ", ".join(cfg.train.pooled_clash()))
        self.upload_shapes = upload_shapes(self.shapes, self.pooled)  # what uploads are checked against
        if roster is None:
            roster = Roster.from_dict(cfg.roster) if cfg.roster else getattr(transport, "roster", None)
        if roster is None:
            raise ConfigError("the run has no roster of organisation keys (RunConfig.roster, `--roster`)")
        self.roster = roster
        if cfg.secure and len(roster) < 2:
            raise ConfigError("secure aggregation needs at least 2 organisations in the roster (a sum of one is no secret)")
        self.optimizer = ServerOptimizer.for_run(cfg, self.pooled)
        # its step in one trajectory, for the guard's twin (the plan carries it only when there is a twin)
        self.kept = self.optimizer.kept_shares(self.shapes) if cfg.train.guard else {}
        try:  # the very check every organisation makes of the plan: better refused here than by all of them
            RoundPlan.for_round(cfg, 1, 0, kept_shares=self.kept).shares(self.shapes)
        except ConfigError as exc:
            raise ConfigError(f"with the guard on, the server learning rate of a linear step is at most {MAX_KEPT_SHARE:g} "
                              f"(an organisation refuses a larger share for its twin): {exc}") from exc
        self.tables = VersionedTables.initial(self.shapes, cfg.seed, cfg.table_scale)
        self.log = RunLog(config=cfg.to_dict())
        self.start_round = 1
        self.known: dict[int, int] = {}  # node -> table version its cache holds
        self.recipe_changes: list[str] = []  # a resumed run's recipe against its checkpoint's, field by field
        self.node_org: dict[int, str] = {}  # node -> roster name it last signed as (for naming a silent node)
        self._round_names: dict[int, str] = {}  # node -> roster name verified this round
        # node -> the working set it asked for in its last accepted reply, and that request's digest
        # (absent: it asked for no working set, and gets every changed row)
        self.wants: dict[int, tuple[dict[str, RowRequest], bytes]] = {}
        self._sync_records: dict[tuple[int, int, bytes], ArrayRecord] = {}  # (tables version, since, request) -> sync
        self._request_rows = (0, 0)  # (tables version, rows held in per-request sync records of that version)
        self.secure: SecurePipeline | None = None
        if cfg.secure:
            from fedembed.secagg.server import SecurePipeline

            self.secure = SecurePipeline(self)
        self.dense_bytes = dense_upload_bytes(self.upload_shapes)
        if self.state_dir is not None:
            self._resume()

    # ------------------------------------------------------------------ state
    def _resume(self) -> None:
        """Continue from the newest usable checkpoint in the state dir (none: a fresh start).

        Raises
        ------
        ConfigError
            Checkpoints exist but none is usable (starting over would silently discard the
            trained tables), or they belong to another run.
        """
        try:
            ckpt = load_latest_checkpoint(self.state_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if ckpt is None:
            return
        run = ckpt.config.get("run")
        if not isinstance(run, dict) or run.get("federation") != self.cfg.to_dict()["federation"]:
            raise ConfigError(f"state dir {self.state_dir} holds a different run; use a new --state-dir")
        shapes = {n: tuple(t.shape) for n, t in ckpt.tables.tables.items()}
        if shapes != {n: tuple(s) for n, s in self.shapes.items()}:
            raise ConfigError(
                f"state dir {self.state_dir} holds tables of shapes {shapes}, this run's are {self.shapes}; "
                "use a new --state-dir or the run's own settings"
            )
        self._say_recipe_changes(run)
        self.tables = ckpt.tables
        self.optimizer.state = ckpt.optimizer_state
        self.log.rounds = ckpt.config.get("rounds", [])
        self.log.initial = ckpt.config.get("initial", {})
        self.start_round = ckpt.round + 1
        log.info("resumed at round %d from %s", self.start_round, self.state_dir)

    def _say_recipe_changes(self, run: dict[str, Any]) -> None:
        """Warn, field by field, where the recipe resumed with differs from the checkpoint's ``run``.

        A resumed run takes its recipe (the organisations' local recipe and the
        coordinator's :data:`SERVER_STEP`) from the command that resumes it, so a changed
        flag, or a default changed by a newer fedembed, changes the recipe mid-run. That may
        be meant; it is never silent. A field the checkpoint lacks was added after it was
        written: the warning says how the older version ran (:data:`BEFORE_FIELD`) and how
        to keep that.
        """
        train = run.get("train")
        if not isinstance(train, dict):
            return
        saved = {**train, **{k: run[k] for k in SERVER_STEP if k in run}}
        now = {**self.cfg.train.to_dict(), **{k: getattr(self.cfg, k) for k in SERVER_STEP}}
        changes = []
        for name in sorted(now):
            if name in saved:
                if saved[name] != now[name]:
                    changes.append(f"{name} {saved[name]!r} -> {now[name]!r}")
            elif name in BEFORE_FIELD and (was := BEFORE_FIELD[name](run)) != now[name]:
                flag = f"--{name.replace('_', '-')} {was:g}"
                changes.append(f"{name} absent from the checkpoint (written by an older fedembed, which ran as "
                               f"{was!r}; {flag} keeps that) -> {now[name]!r}")
        self.recipe_changes = changes  # `fedembed server` shows them (the start event of progress.jsonl)
        if changes:
            log.warning("resuming from %s with a recipe that differs from the checkpoint's: %s; from the next round "
                        "on the new values apply (pass the old ones to keep them)", self.state_dir, "; ".join(changes))

    def _checkpoint(self) -> None:
        if self.state_dir is None:
            return
        meta = {"run": self.cfg.to_dict(), "rounds": self.log.rounds, "initial": self.log.initial}
        save_checkpoint(self.state_dir, Checkpoint(self.tables, self.optimizer.state, meta))

    # ------------------------------------------------------------------ messages
    def _message(self, node: int, round_: int, evaluate_only: bool, ahead: bool = False) -> RecordDict:
        since = self.known.get(node, 0)
        want = self.wants.get(node)
        plan = RoundPlan.for_round(self.cfg, round_, since, evaluate_only, request=want[1].hex() if want else "",
                                   next_session=ahead, early_unmask=self._early_unmask(), kept_shares=self.kept)
        content = RecordDict({"config": ConfigRecord(plan.to_config())})
        # Organisations at the same version with the same request (or none) get the very
        # same record: built once per round, not once per organisation (100 orgs x a 6 MiB
        # sync was 600 MiB). An organisation that asked for its working set gets only its
        # rows changed since its version, plus the rows new to the set.
        # Per-request records are bounded: together at most REQUEST_RECORD_TABLES tables' rows
        # per version; past that an organisation gets the shared full sync (which it always
        # accepts, and which reveals nothing), so memory stays bounded however many ask.
        key = (self.tables.version, since, want[1] if want else b"")
        if key not in self._sync_records:
            self._sync_records = {k: v for k, v in self._sync_records.items() if k[0] == self.tables.version}
            if self._request_rows[0] != self.tables.version:
                self._request_rows = (self.tables.version, 0)
            rows = self.tables.rows_requested(want[0], since) if want else self.tables.rows_since(since)
            n = sum(int(rs.ids.size) for rs in rows.values())
            budget = REQUEST_RECORD_TABLES * sum(s[0] for s in self.shapes.values())
            if want and self._request_rows[1] + n > budget:
                log.info("sync records of this round hold %d rows; node %d gets the full sync", self._request_rows[1], node)
                return self._full_message(node, round_, evaluate_only, since, ahead)
            if want:
                self._request_rows = (self.tables.version, self._request_rows[1] + n)
            self._sync_records[key] = encode_sync(rows, self.shapes)
        content["sync"] = self._sync_records[key]
        return content

    def _early_unmask(self) -> bool:
        """Whether this round's secure sessions unmask early (False for good once a dropout cost a round)."""
        return self.secure is None or self.secure.early_unmask

    def _full_message(self, node: int, round_: int, evaluate_only: bool, since: int, ahead: bool = False) -> RecordDict:
        """The message with every row changed since ``since`` (the shared record), whatever the node asked for."""
        plan = RoundPlan.for_round(self.cfg, round_, since, evaluate_only, next_session=ahead,
                                   early_unmask=self._early_unmask(), kept_shares=self.kept)
        content = RecordDict({"config": ConfigRecord(plan.to_config())})
        key = (self.tables.version, since, b"")
        if key not in self._sync_records:
            self._sync_records[key] = encode_sync(self.tables.rows_since(since), self.shapes)
        content["sync"] = self._sync_records[key]
        return content

    def _read_request(self, node: int, want: ArrayRecord | None) -> dict[str, RowRequest] | None:
        """The working set a reply asks for: in full, or by the digest of the one held for ``node``.

        Raises
        ------
        UpdateError
            A request outside its schema, or a digest of a request this node never made.
        """
        if want is None:
            return None
        digest = decode_request_digest(want)
        if digest is None:
            return decode_request(want, self.shapes)
        held = self.wants.get(node)
        if held is None or held[1] != digest:
            raise UpdateError("a working-set request by digest, but not the digest of the request held for it")
        return held[0]

    def _set_request(self, node: int, request: dict[str, RowRequest] | None) -> None:
        """Keep the working set an accepted reply asks for (None: every changed row from now on)."""
        if request is None:
            self.wants.pop(node, None)
        else:
            self.wants[node] = (request, request_digest(request))

    def train_message(self, node: int, round_: int, ahead: bool = False) -> RecordDict:
        """The ``train`` message of ``round_`` for ``node``: the plan and its row sync (``ahead``: the plan asks
        for the keys of the next round's secure session)."""
        return self._message(node, round_, False, ahead)

    def no_reply(self, entry: dict, who: str, error: str | None, stage: str = "", verb: str = "failed") -> None:
        """Record an organisation that failed instead of replying; in a strict run, fail the run.

        Raises
        ------
        RunFailed
            With ``strict`` on: every organisation of a simulation is expected in every
            round, so a failure is the run's error, not a dropout.
        """
        self.refuse(entry, who, f"{stage + ': ' if stage else ''}no reply: {error}", verb)
        if self.strict:
            raise RunFailed(f"round {entry['round']}: {who} failed{' at ' + stage if stage else ''}: "
                            f"{_printable(str(error))} (a simulation runs every organisation in every round; "
                            "--drop injects dropouts on purpose)")

    def refuse(self, entry: dict, who: str, reason: str, verb: str = "refused") -> None:
        """Record and log a refusal under ``who`` (a roster name or ``node <id>``); the reason is made printable."""
        reason = _printable(reason)
        entry["rejected"][who] = reason
        log.warning("round %d: %s %s: %s", entry["round"], who, verb, reason)

    def check_signed(self, node: int, content: RecordDict, round_: int, stage: str, expected: str | None = None) -> str | None:
        """Bind a reply to the organisation whose roster key signed it; returns a fault, or None.

        The reply must be signed for this run, ``round_``, ``stage`` and ``node``; a name may
        answer from one node per round only (nobody is counted twice), and, when
        ``expected`` is given, it must be the name this node answered as earlier in the round.
        """
        try:
            name = verify_reply(content, self.roster, self.cfg.run_key(), round_, stage, node)
        except (IdentityError, UpdateError) as exc:
            return str(exc)
        if expected is not None and name != expected:
            return f"signed as {name!r}, but this node answered as {expected!r} earlier in the round"
        other = next((n for n, nm in self._round_names.items() if nm == name and n != node), None)
        if other is not None:
            return f"{name!r} already answered this round from node {other}; an organisation is counted once"
        self._round_names[node] = name
        self.node_org[node] = name
        return None

    def read_train_reply(self, rep: Reply, entry: dict, round_: int, secure: bool = False) -> tuple[str | None, RowUpdate | None]:
        """Validate a ``train`` reply; returns (organisation, update), (None, None) when refused.

        In secure mode the update travels masked (:mod:`fedembed.secagg.server` reads the
        secure records): the returned update is an empty dict when the reply is usable.
        """
        name, update = self._read_reply(rep, entry, round_, "train", round_ - 1, secure=secure)
        if name is not None and secure:
            return name, {}
        return name, update

    def _read_reply(
        self, rep: Reply, entry: dict, round_: int, stage: str, evaluated_round: int, secure: bool = False
    ) -> tuple[str | None, RowUpdate | None]:
        """Validate one reply; returns (org, update). Faults are logged and recorded.

        Nothing a reply says about itself is believed: the organisation is the roster key
        that signed it for this run, round, stage and node; records outside the schema
        (a ``head`` among them: no reply has a place for one), non-finite metrics, and an ``ok``
        training reply without its update are refused.
        """
        who = self.node_org.get(rep.node, f"node {rep.node}")
        if rep.error is not None or rep.content is None:
            self.no_reply(entry, who, rep.error)
            return None, None
        c = rep.content
        size = record_bytes(c)
        entry["upload_bytes"] += size
        if size > self.cfg.max_message_bytes:
            self.refuse(entry, who, f"reply of {size} bytes exceeds the limit of {self.cfg.max_message_bytes}")
            return None, None
        fault = self.check_signed(rep.node, c, round_, stage)
        if fault is not None:
            self.refuse(entry, f"node {rep.node}", fault)
            return None, None
        org = self._round_names[rep.node]
        training = stage == TRAIN
        allowed = {"info", "metrics", "train", SIG_RECORD}
        if training:
            # secure: an advert (a session started with its round) or the masked update (one set up ahead), and
            # the next round's advert; the secure round checks which it needs
            secure_records = ({"secagg", "masked", "complaints", "next", "unmask", "next_shares", "next_share_sigs",
                               "next_error", "next_advert"} | ({"rows"} if self.cfg.row_set == "revealed" else set()))
            allowed |= secure_records if secure else {"update"}
            allowed |= {"want"}  # the organisation's own choice of rows to sync (fedembed.workingset)
        try:
            extra = sorted(set(c.keys()) - allowed)
            if extra:
                raise UpdateError(f"records outside the reply schema: {extra}")
            if "info" not in c:
                raise UpdateError("no 'info' record (every reply carries its status there)")
            info = c["info"]
            status = info.get("status")
            cache_version = info.get("cache_version", 0)
            if not isinstance(cache_version, int) or isinstance(cache_version, bool):
                raise UpdateError(f"cache_version must be an integer, got {cache_version!r}")
            metrics = _finite_metrics(c["metrics"]) if "metrics" in c else {}
            stats = _finite_metrics(c["train"]) if "train" in c else {}
            if "dp_epsilon" in stats:  # its own privacy spend, as its ledger composes it (recorded, not trusted)
                entry.setdefault("privacy", {})[org] = {"epsilon": stats["dp_epsilon"], "delta": stats.get("dp_delta", 0.0)}
            if status in ("stale", "ok") and training:
                request = self._read_request(rep.node, c.get("want"))
            if status == "stale":
                self.known[rep.node] = cache_version if 0 <= cache_version <= self.tables.version else 0
                if training:
                    self._set_request(rep.node, request)
                if metrics:
                    self.log.set_metrics(evaluated_round, org, metrics)
                raise UpdateError(f"cache at version {cache_version} was stale; resync next round")
            if status == "exhausted":  # it applied the sync and evaluated; its DP budget allows no more training
                self.known[rep.node] = self.tables.version
                if metrics:
                    self.log.set_metrics(evaluated_round, org, metrics)
                spent = stats.get("dp_epsilon")
                raise UpdateError("its privacy budget is spent: it evaluates, and trains no more" + (
                    "" if spent is None else " (its budget allows not even one round)" if spent == 0
                    else f" (epsilon {spent:.4g} spent)"))
            if status == "refused":
                raise UpdateError(f"refused the coordinator's message: {_printable(info.get('error', ''), 300)}")
            if status != "ok":
                raise UpdateError(f"unknown status {status!r}")
            update = None
            if "update" in c:
                update = decode_update(c["update"], self.upload_shapes, max_weight=self.cfg.train.max_row_weight)
                if self.pooled:
                    check_upload(update, self.cfg.delta_clip, self.pooled)
            elif training and not secure:
                raise UpdateError("status ok but no update in a training reply")
            self.known[rep.node] = self.tables.version
            if training:
                self._set_request(rep.node, request)
            if metrics:
                self.log.set_metrics(evaluated_round, org, metrics)
            return org, update
        except (UpdateError, KeyError, TypeError, ValueError) as exc:
            self.refuse(entry, org, str(exc))
            return None, None

    # ------------------------------------------------------------------ rounds
    def run(self) -> RunLog:
        """Run the remaining rounds and the closing evaluation; returns the run log."""
        rng = random.Random(self.cfg.seed)
        nodes = self._connected()
        last = self.cfg.rounds
        for round_ in range(self.start_round, self.cfg.rounds + 1):
            nodes = self._connected()
            k = max(self.cfg.min_orgs, int(np.ceil(self.cfg.fraction * len(nodes))))
            sampled = sorted(rng.sample(sorted(nodes), min(k, len(nodes))))
            self.run_round(round_, sampled)
            # replies of round r carry the evaluation after round r - 1: the evaluations known so far
            known = [self.log.initial, *(r["metrics"] for r in self.log.rounds[:-1])]
            if round_ < self.cfg.rounds and stalled(known, self.cfg.train.patience):
                log.info("round %d: no organisation's validation score improved for %d rounds; stopping early",
                         round_, self.cfg.train.patience)
                self.log.extra["stopped_early"] = round_
                last = round_
                break
        if self.strict and self.log.rounds and not any(applied(e) for e in self.log.rounds):
            first = self.log.rounds[0]
            why = "; ".join(f"{who}: {reason}" for who, reason in sorted(first["rejected"].items()))
            raise RunFailed(f"no round changed the tables: {first.get('abandoned') or why or first.get('unchanged')} "
                            "(round 1; a simulation whose organisations never train has no result to report)")
        self.closing_evaluation(sorted(nodes), last)
        return self.log

    def _connected(self) -> list[int]:
        """The connected nodes, once at least ``max(min_orgs, wait_for)`` are (fewer than ``wait_for``: an error)."""
        nodes = self.transport.node_ids(max(self.cfg.min_orgs, self.wait_for, 1), self.cfg.round_timeout)
        if len(nodes) < self.wait_for:
            raise ConfigError(
                f"only {len(nodes)} of the {self.wait_for} organisations connected within {self.cfg.round_timeout:.0f} s"
            )
        return nodes

    def run_round(self, round_: int, nodes: list[int]) -> dict:
        """One round: sync + train + aggregate (plain or secure) + update + checkpoint."""
        t0 = time.perf_counter()
        entry = self.log.new_round(round_)
        self._round_names = {}
        if self.secure is not None:
            # the next round's session is set up on this round's messages when one follows with the same organisations
            ahead = self.cfg.secure_ahead and round_ < self.cfg.rounds and self.cfg.fraction >= 1
            agg = self.secure.run_round(round_, nodes, entry, ahead=ahead)
            entry.setdefault("clients", 0)
            entry["dense_upload_bytes"] = self.dense_bytes * max(len(nodes), 1)
        else:
            agg = self._plain_exchange(round_, nodes, entry, t0)
        t1 = time.perf_counter()
        if agg is not None and entry["clients"] >= self.cfg.min_orgs:
            if self.pooled:  # the sums of steps and normalisers back into steps
                agg = narrow(agg, self.cfg.delta_clip, self.pooled)
            changed = self.optimizer.step(self.tables, agg, round_)
            entry["rows_changed"] = changed
        else:
            # said in the round's log entry too: progress displays and metrics.json show it, not only this logger
            entry["unchanged"] = f"{entry['clients']} usable update(s), fewer than --min-orgs {self.cfg.min_orgs}"
            log.warning("round %d: %s; tables unchanged", round_, entry["unchanged"])
            self.tables.version = round_
        entry["stages"]["aggregate"] = {"seconds": time.perf_counter() - t1}
        entry["wall_seconds"] = time.perf_counter() - t0  # before the checkpoint, so a resumed log keeps it
        self._checkpoint()
        if self.on_round:
            self.on_round(entry)
        return entry

    def _plain_exchange(self, round_: int, nodes: list[int], entry: dict, t0: float):
        """The plain round trip: sync + train, validated replies summed per row."""
        contents = {n: self._message(n, round_, False) for n in nodes}
        down = sum(record_bytes(c) for c in contents.values())
        entry["download_bytes"] += down
        replies = self.transport.exchange(TRAIN, contents, self.cfg.round_timeout)
        updates: list[RowUpdate] = []
        for rep in replies:
            _, update = self._read_reply(rep, entry, round_, TRAIN, round_ - 1)
            if update is not None:
                updates.append(update)
        entry["stages"]["train"] = {
            "seconds": time.perf_counter() - t0,
            "upload_bytes": entry["upload_bytes"],
            "download_bytes": down,
        }
        entry["clients"] = len(updates)
        entry["dense_upload_bytes"] = self.dense_bytes * max(len(replies), 1)
        agg = None
        if updates:  # summed in the secure path's exact fixed point: the two paths agree bit for bit
            scales = ValueScales(n=len(updates), clip_delta=self.cfg.delta_clip, max_weight=self.cfg.train.max_row_weight)
            agg = fixed_point_sum(updates, self.upload_shapes, scales, self.cfg.wire_dtype)
        return agg

    def closing_evaluation(self, nodes: list[int], final_round: int | None = None) -> None:
        """Every organisation evaluates the final tables (after ``final_round``, default the last) with its own head."""
        t0 = time.perf_counter()
        final = self.cfg.rounds if final_round is None else int(final_round)
        last = self.log.rounds[-1] if self.log.rounds else self.log.new_round(final)
        contents = {n: self._message(n, final + 1, True) for n in nodes}
        down = sum(record_bytes(c) for c in contents.values())
        replies = self.transport.exchange(EVALUATE, contents, self.cfg.round_timeout)
        scratch = {"round": final, "rejected": {}, "upload_bytes": 0}
        self._round_names = {}
        for rep in replies:
            self._read_reply(rep, scratch, final + 1, EVALUATE, final)
        self.log.extra["closing_evaluation"] = {
            "download_bytes": down,
            "upload_bytes": scratch["upload_bytes"],
            "seconds": time.perf_counter() - t0,
            "rejected": scratch["rejected"],
        }
        if self.on_round:
            self.on_round({**last, "closing": True})


def _printable(text: str, limit: int = 500) -> str:
    """``text`` with control characters (newlines that would forge a log line) replaced, cut to ``limit``."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))[:limit]


def _finite_metrics(record: object) -> dict[str, float]:
    """Metric values as floats; raises UpdateError for anything but finite numbers."""
    out = {}
    for key, value in record.items():  # type: ignore[attr-defined]
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise UpdateError(f"metric {_printable(key, 60)!r} is not a finite number: {_printable(repr(value), 60)}")
        out[str(key)] = float(value)
    return out

