"""One organisation's side of a round, with no Flower in it.

:class:`Organisation` takes the coordinator's :class:`fedembed.config.RoundPlan` and row
sync, brings its table cache up to date, evaluates its private head on the fresh tables
(these are the metrics of the previous round), trains, and hands back the row-sparse
update. Its head and the head's optimizer state are saved in its own state directory and
are never part of what it returns: no message has a place for a head. (The baselines that
share heads or train alone run in one process, :mod:`fedembed.baselines`.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from fedembed.config import ConfigError, RoundPlan, StageHeader, node_flag, node_int
from fedembed.errors import FedembedError
from fedembed.dp import BudgetExhausted, DPError
from fedembed.dp.accounting import PrivacyLedger
from fedembed.dp.distributed import DistributedNoise
from fedembed.dp.noise import SecureRandom, noise_secret
from fedembed.dp.policy import DPPolicy
from fedembed.faults import SimulatedDropout, check_drop
from fedembed.identity import Identity, sign_reply
from fedembed.model import SplitModel
from fedembed.normaliser import upload_shapes
from fedembed.secagg.client import SecureMember
from fedembed.secagg.protocol import SecurePolicy
from fedembed.sparse import RowUpdate, UpdateError
from fedembed.store import OrgState, RoundAnswered, check_evaluation_open, check_round_open, contributed_securely
from fedembed.tables import RowRequest, RowSync, apply_sync, init_table, request_digest
from fedembed.spec import FederationSpec, SpecError, TableSpec
from fedembed.task import Task, TaskError, TaskSpec, load_task, resolve_device, task_from_node_config
from fedembed.recipe import TrainConfig, WorkLimits
from fedembed.guard import Guard
from fedembed.serving import BestValidation, ServingContext, ServingPolicy, SharedOnly
from fedembed.train import (
    NonFiniteError, build_seeded, check_finite, evaluate_splits, fit_head, make_head_optimizer, nonfinite_parts, round_rng,
    train_local,
)
from fedembed.wire import decode_sync, encode_request, encode_request_digest, encode_update, reply_content
from fedembed.workingset import (
    FULL, PADDED, RequestCover, RowState, StaleRowError, SyncPolicy, SyncRefused, decoy_key, derive_working_set,
    lookup_guard, used_rows,
)

log = logging.getLogger(__name__)


@dataclass
class OrgReply:
    """What an organisation returns for one stage.

    Attributes
    ----------
    status : str
        ``ok`` or ``stale`` (its cache is not at ``plan.since``: nothing trained, the
        coordinator should resend from ``cache_version``).
    cache_version : int
        Version of its table cache after this stage.
    update : RowUpdate or None
        The row-sparse update (None when evaluating only, or stale).
    metrics : dict
        Evaluation of what it serves (:mod:`fedembed.serving`) on the synced tables,
        ``val_*`` and test metrics.
    train_stats : dict
        Examples, loss, steps of the local training.
    request : dict or None
        The working set it asks the next sync to cover (:mod:`fedembed.workingset`);
        None: every changed row.
    """

    org: str
    status: str
    cache_version: int
    update: RowUpdate | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_stats: dict[str, float] = field(default_factory=dict)
    request: dict[str, RowRequest] | None = None


class Organisation:
    """An organisation: its identity, its private state directory, its own task and device.

    Parameters
    ----------
    org : int
        Its index in a simulation (fault injection, default file names); -1 when deployed.
    state_dir : Path
        Its own state directory (head, optimizer state, table cache).
    identity : Identity
        Its roster name, private identity key and the federation's roster: every reply is
        signed with it.
    policy : SecurePolicy, optional
        The rules it holds secure-aggregation sessions to (defaults if None).
    task : TaskSpec
        Its own task (:mod:`fedembed.task`), from its own configuration, never from a message.
    device : str
        ``cpu``, ``cuda``, ``cuda:<n>`` or ``auto`` (CUDA when available).
    dp_policy : DPPolicy, optional
        Its own DP floor and budget (:mod:`fedembed.dp.policy`), held against any recipe.
    sync : SyncPolicy, optional
        Which rows it asks the coordinator to sync (:mod:`fedembed.workingset`; default
        ``auto``: in plain and secure ``revealed`` rounds the rows its uploads showed plus a
        secret-keyed cover over the rest of its working set; in ``union``/``dense`` the full sync).
    noise_seed : str, optional
        Seed of the noise its DP releases (tests, reproducible simulations: whoever knows
        it can regenerate that noise); None, the default: a secret key of its own kept in
        its state directory (:func:`fedembed.dp.noise.noise_secret`).
    normaliser_upload : bool
        Whether it uploads its Adam normaliser of the rows it touched when the recipe asks
        (the pooled normaliser, :mod:`fedembed.normaliser`); False: a training plan that
        asks is refused, naming the tables.
    keep_best : bool
        Keep a copy of its served (best-validation) state's head and tables in ``best/``.
    max_runs : int
        The most runs (run keys) it answers from this state directory; 0: no limit. Its
        operator's rule: each run is another series of updates and evaluations of its data
        (:func:`fedembed.store.claim_evaluation`).
    limits : WorkLimits, optional
        The most work one message's recipe may ask of it (defaults if None).
    """

    def __init__(
        self, org: int, state_dir: Path, identity: Identity, policy: SecurePolicy | None = None,
        task: TaskSpec | None = None, device: str = "cpu", dp_policy: DPPolicy | None = None,
        sync: SyncPolicy | None = None, noise_seed: str | None = None, normaliser_upload: bool = True,
        keep_best: bool = False, max_runs: int = 0, limits: WorkLimits | None = None,
    ) -> None:
        if task is None:
            raise TaskError("an organisation needs its own task: --task (or node config task=...)")
        self.org = int(org)
        self.state = OrgState(Path(state_dir))
        self.identity = identity
        self.policy = policy or SecurePolicy()
        self.task_spec = task
        self.device = resolve_device(device)
        self.dp_policy = dp_policy or DPPolicy()
        self.sync = sync or SyncPolicy()
        self.noise_seed = noise_seed
        self.normaliser_upload = bool(normaliser_upload)
        self.keep_best = bool(keep_best)  # its own choice: keep its served state's model whatever the recipe says
        if int(max_runs) != max_runs or max_runs < 0:
            raise ConfigError(f"max-runs must be an integer >= 0 (0: no limit), got {max_runs!r}")
        self.max_runs = int(max_runs)
        self.limits = limits or WorkLimits()

    @staticmethod
    def from_node_config(
        nc: Mapping[str, Any], state_root: str | None = None, key_dir: str | None = None,
        roster: str | None = None, tasks: list[TaskSpec] | None = None,
    ) -> Organisation:
        """The organisation a SuperNode's node config describes (see :meth:`SecureMember.from_node_config`).

        Its task comes from the node config (``task``, ``data``, ``task-options``,
        ``task-config``, ``device``: :func:`fedembed.task.task_from_node_config`) or, in a
        simulation, from ``tasks[partition-id]``; ``threads`` sets torch's CPU threads
        (default: torch's choice); ``sync`` and ``sync-pad`` its :class:`SyncPolicy`;
        ``dp-min-noise-multiplier``, ``dp-max-epsilon``, ``dp-delta`` its :class:`DPPolicy`;
        ``dp-noise-seed`` (tests and simulations only) seeds its DP noise;
        ``normaliser-upload`` (``true``/``false``, default true) whether it uploads its Adam
        normaliser when the recipe asks; ``keep-best-state`` (default false) whether it keeps
        a copy of its served (best-validation) state's head and tables in ``best/`` for
        ``fedembed export --best``, whatever the recipe says; ``max-runs`` (default 0, no
        limit) how many runs it answers; ``max-epochs``, ``max-cooc-negatives``,
        ``max-batch-size`` its :class:`fedembed.recipe.WorkLimits`.
        """
        member = SecureMember.from_node_config(nc, state_root, key_dir, roster)
        if "threads" in nc:  # otherwise torch's own choice
            torch.set_num_threads(int(nc["threads"]))
        if "task" in nc or "task-config" in nc or tasks is None:
            spec, device = task_from_node_config(nc)
        else:
            spec, device = tasks[member.org], str(nc.get("device", "cpu"))
        return Organisation(member.org, member.state_dir, member.identity, member.policy, spec, device,
                            DPPolicy.from_mapping(nc), SyncPolicy.from_node_config(nc), member.noise_seed,
                            normaliser_upload_rule(nc), node_flag(nc, "keep-best-state", False),
                            node_int(nc, "max-runs", 0), WorkLimits.from_mapping(nc))

    @property
    def member(self) -> SecureMember:
        """What the secure stages need of this organisation (no task, no torch)."""
        return SecureMember(self.org, self.state.dir, self.identity, self.policy, self.noise_seed)

    def noise(self, purpose: str, plan: RoundPlan) -> SecureRandom:
        """The secret random source of one DP release of ``plan``'s round (:mod:`fedembed.dp.noise`)."""
        return SecureRandom.derive(noise_secret(self.state.dir, self.noise_seed), purpose, self.identity.name,
                                   plan.run_key, plan.round)

    @property
    def task(self) -> Task:
        """Its task, loaded once per process, on its device."""
        task = load_task(self.task_spec)
        task.device = self.device
        return task

    def table_specs(self) -> dict[str, TableSpec]:
        """Its own shared tables (shape, vocabulary digest), computed once per process."""
        key = self.task_spec.to_json()
        if key not in _TABLE_SPECS:
            _TABLE_SPECS[key] = self.task.table_specs()
        return _TABLE_SPECS[key]

    def check_federation(self, federation: FederationSpec) -> None:
        """Refuse a federation whose tables differ from this organisation's model (naming the table).

        Raises
        ------
        SpecError
            Names this organisation, the table and how it differs.
        """
        try:
            federation.check(self.table_specs())
        except SpecError as exc:
            raise SpecError(f"{self.identity.name}: {exc}") from None

    def handle(self, plan: RoundPlan, sync: dict[str, RowSync]) -> OrgReply:
        """Run one stage of a round (see module docstring).

        Raises
        ------
        SyncRefused
            A sync that contradicts what this organisation holds, or tables that would be
            non-finite once synced (nothing saved).
        NonFiniteError
            Its saved head holds NaN or inf (left as it is), or the head re-fit or local
            training made the head, its optimizer state, the tables or the update
            non-finite: the head and optimizer state saved before are kept as they were.
        """
        task = self.task
        name = self.identity.name
        cfg = plan.recipe().at_round(plan.round)
        if cfg.dp or cfg.dp_distributed:  # its own budget wins where it is tighter
            epsilon, delta = self.dp_policy.budget(cfg.dp_target_epsilon, cfg.dp_target_delta)
            cfg = replace(cfg, dp_target_epsilon=epsilon, dp_target_delta=delta)
        shapes = {n: t.shape for n, t in self.table_specs().items()}
        tables, version = self.state.load_tables(shapes, plan.seed, plan.table_scale, plan.run_key)
        damaged = sorted(n for n, t in tables.items() if nonfinite_parts(table=t))
        if damaged:  # written before syncs were checked, or altered on disk: a copy of the coordinator's, rebuilt
            log.error("%s: its table cache holds non-finite values (NaN or inf) in table(s) %s; it is rebuilt from "
                      "version 0 by a resync of every changed row", name, damaged)
            tables, version = {n: init_table(n, s, plan.seed, plan.table_scale) for n, s in shapes.items()}, 0
        rows = RowState.load(self.state.dir, shapes, version, plan.run_key)  # per-row freshness (workingset)
        mode = self.sync.resolve(plan.secure, plan.row_set)
        if plan.since != version and plan.since != 0:
            log.warning("%s: cache at version %d, coordinator assumed %d; asking for a resync", name, version, plan.since)
            return OrgReply(name, "stale", version, request=self._ask(task, shapes, mode, rows, plan))
        rebuilt = plan.since == 0 and version != 0
        if plan.request and (rows.request is None or request_digest(rows.request).hex() != plan.request or rebuilt):
            log.warning("%s: a sync of a working set other than the one on record here; asking again", name)
            return OrgReply(name, "stale", version, request=self._ask(task, shapes, mode, rows, plan))
        if rebuilt:
            tables = {n: init_table(n, s, plan.seed, plan.table_scale) for n, s in shapes.items()}
            rows.rebuilt()
        # refuses what contradicts what it holds (rows it did not ask for, stamps rolled back)
        rows.apply(sync, "requested" if plan.request else "all", plan.since, plan.round - 1, plan.secure)
        apply_sync(tables, sync)
        version = plan.round - 1
        if rebuilt or damaged:  # a new base: its version-0 rows were never checked (the synced rows were, on decoding)
            bad = sorted(n for n, t in tables.items() if nonfinite_parts(table=t))
            if bad:
                raise SyncRefused(f"table(s) {bad} hold non-finite values once synced (table_scale "
                                  f"{plan.table_scale!r}); the table cache is left as it was")
            self.state.save_tables(tables, version, plan.run_key)
        else:  # only the synced rows are written
            self.state.save_sync(tables, sync, version, plan.run_key)
        if mode != FULL:  # rows it will look up that are not current: fetched next round (first use)
            missing = rows.stale(used_rows(task, shapes, rows))
            if missing:
                log.info("%s: %d rows of its working set not yet synced; fetching them next round", name,
                         sum(int(v.size) for v in missing.values()))
                return OrgReply(name, "stale", version, request=self._ask(task, shapes, mode, rows, plan))
        try:
            reply = self._evaluate_and_train(task, cfg, plan, shapes, tables, rows if mode != FULL else None)
        except StaleRowError as exc:  # a lookup outside the working set: every such row joins it, fetched next round
            found = rows.stale(derive_working_set(task))  # one pass over its data finds them all, not just this one
            log.warning("%s: %s; %d rows join its working set", name, exc, sum(int(v.size) for v in found.values()))
            rows.add_extra(exc.rows)
            rows.add_extra(found)
            return OrgReply(name, "stale", version, request=self._ask(task, shapes, mode, rows, plan))
        if not plan.evaluate_only:
            if reply.update is not None and not plan.secure:  # kept to check the next sync brings them back
                rows.uploaded = {n: tu.ids.astype(np.int64) for n, tu in reply.update.items()}
                rows.uploaded_round = plan.round
            # the row ids this very reply shows the coordinator (plain update, secure revealed row set)
            shown = reply.update if reply.update is not None and (not plan.secure or plan.row_set == "revealed") else None
            reply.request = self._ask(task, shapes, mode, rows, plan, shown)
        else:
            rows.save(self.state.dir, plan.run_key)
        return reply

    def _ask(self, task: Task, shapes: dict[str, tuple[int, int]], mode: str, rows: RowState,
             plan: RoundPlan, shown: RowUpdate | None = None) -> dict[str, RowRequest] | None:
        """The rows its reply asks the next sync for (None under ``full``), kept on record with the row state.

        ``shown``: the update whose row ids the same reply shows the coordinator (``padded``
        asks for those in the clear from now on, :class:`fedembed.workingset.RequestCover`).
        """
        if mode == FULL:
            rows.request = None
            request = None
        else:
            asked = used_rows(task, shapes, rows)
            if mode == PADDED:  # what its uploads showed, in the clear; every other row it uses under the cover
                cover = RequestCover.load(self.state.dir, shapes, plan.run_key)
                if shown:
                    cover.show({n: tu.ids for n, tu in shown.items()})
                asked = cover.ask(asked, shapes, self.sync.pad, decoy_key(self.state.dir))
                cover.save(self.state.dir, plan.run_key)
            request = rows.make_request(asked)
        rows.save(self.state.dir, plan.run_key)
        return request

    def _evaluate_and_train(
        self, task: Task, cfg: TrainConfig, plan: RoundPlan, shapes: dict[str, tuple[int, int]],
        tables: dict[str, np.ndarray], rows: RowState | None,
    ) -> OrgReply:
        """Evaluate on the synced tables, then train (unless evaluating only); ``rows``: guard every lookup."""
        name = self.identity.name
        version = plan.round - 1

        model = build_seeded(task, plan.seed, name)  # its first head repeats from --seed; later ones are loaded
        if cfg.residual:
            model.add_residuals()
        model.set_tables(tables)
        saved = self.state.load_head(model)  # another model's head.pt is set aside, not failed on
        if saved is not None:
            bad = nonfinite_parts(head=saved["head"], optimizer=saved.get("optimizer"),
                                  table_state=saved.get("table_state"))
            if bad:  # saved before heads were checked: it is the organisation's own, never dropped without a word
                log.error("%s: its saved head %s holds non-finite values in %s; it is left as it is: move it aside "
                          "to start a fresh head", name, self.state.dir / "head.pt", bad[:5])
                raise NonFiniteError("its saved head (head.pt) holds non-finite values (NaN or inf), saved before "
                                     "heads were checked; it trains no more until its operator moves it aside")
            model.load_head_state_dict(saved["head"])
        model.to(self.device)
        head_opt = make_head_optimizer(model, cfg, saved["optimizer"] if saved else None)
        table_state = (saved or {}).get("table_state", {}) if cfg.keep_table_state else None
        extra: dict[str, Any] = {"table_state": table_state} if table_state is not None else {}
        if saved and "dp_ledger" in saved:  # a head saved here never drops the privacy spend kept with it
            extra["dp_ledger"] = saved["dp_ledger"]
        rng = round_rng(plan.seed, name, plan.round)
        with lookup_guard(model, rows) if rows is not None else contextlib.nullcontext():
            if cfg.head_epochs > 0:  # FedRep: the head meets the synced tables before it is evaluated (and served) on them
                fit_head(task, model, cfg, head_opt, rng)
            metrics = evaluate_splits(task, model)
            context = ServingContext(task, cfg, plan.round, plan.seed, plan.table_scale, plan.run_key, shapes,
                                     train=not plan.evaluate_only, who=name, kept_shares=plan.shares(shapes))
            metrics = serving_policy(cfg, self.state.dir, self.keep_best).serve(context, model, metrics)
            if plan.evaluate_only:
                if cfg.head_epochs > 0:  # the head evaluated is the head kept (and exported)
                    self._save_head(model, head_opt, plan.round, extra, "the head re-fit")
                return OrgReply(name, "ok", version, metrics=metrics)

            ledger = None
            if cfg.dp or cfg.dp_distributed:  # its privacy spend so far, kept with its head: composed over its rounds
                ledger = PrivacyLedger(cfg.dp_target_delta, cfg.dp_target_epsilon or None)
                ledger.resume((saved or {}).get("dp_ledger"))
            noise = DistributedNoise.for_recipe(cfg, shapes, plan.delta_clip)
            try:
                if noise is not None:  # organisation-level: this round's share of the secure sum's noise
                    ledger.check_next(noise.round())
                update, stats = train_local(
                    task, model, cfg, head_opt, rng, start_tables=tables, table_state=table_state,
                    fit_head_first=False, dp_ledger=ledger, dp_random=self.noise("record", plan) if cfg.dp else None,
                    delta_clip=plan.delta_clip,
                )
                if noise is not None:
                    ledger.record(noise.round())
                    eps, delta = ledger.spent()
                    stats.update({"dp_epsilon": eps, "dp_delta": delta, "dp_noise_multiplier": noise.noise_multiplier,
                                  "dp_noise_shares": float(noise.shares)})
            except BudgetExhausted as exc:  # nothing trained, nothing saved: it only evaluates from now on
                log.warning("%s: %s", name, exc)
                eps, delta = ledger.spent()  # what it has spent: the run's privacy report keeps it (recorded, not trusted)
                return OrgReply(name, "exhausted", version, metrics=metrics,
                                train_stats={"dp_exhausted": 1.0, "dp_epsilon": eps, "dp_delta": delta})
        if ledger is not None:
            extra["dp_ledger"] = ledger.to_dict()
        check_finite("local training", update={n: tu.delta for n, tu in update.items()})
        self._save_head(model, head_opt, plan.round, extra, "local training")
        return OrgReply(name, "ok", version, update=update, metrics=metrics, train_stats=stats)

    def _save_head(self, model: SplitModel, head_opt: torch.optim.Optimizer, round_: int, extra: dict[str, Any],
                   what: str) -> None:
        """Save the head, its optimizer state and ``extra`` (kept table moments, ledger), all finite or nothing.

        Raises
        ------
        NonFiniteError
            ``what`` (the training that produced them) left one of them non-finite: the
            head saved before stays as it was.
        """
        head, optimizer = model.head_state_dict(), head_opt.state_dict()
        check_finite(what, head=head, optimizer=optimizer, table_state=extra.get("table_state"))
        self.state.save_head(head, optimizer, round_, **extra)


def serving_policy(cfg: TrainConfig, state_dir: Path, keep_best: bool = False) -> ServingPolicy:
    """What the organisation serves: the guard (kept in ``state_dir``) when the recipe asks for it, else the
    shared model; with ``cfg.serve_best``, the best-validation state of either (:class:`BestValidation`), whose
    model is kept in ``best/`` when the recipe or the organisation itself (``keep_best``) asks."""
    inner: ServingPolicy = Guard(state_dir) if cfg.guard else SharedOnly()
    return BestValidation(inner, state_dir, keep=keep_best) if cfg.serve_best else inner


_TABLE_SPECS: dict[str, dict[str, TableSpec]] = {}

MESSAGE_RECORDS = {"config", "sync"}
"""The records of a ``train`` or ``evaluate`` message: its plan and its row sync, nothing else (a secure ``train``
message may also bring a session set up ahead its routed shares: :data:`fedembed.secagg.client.TRAIN_RECORDS`)."""


class OrganisationFailed(FedembedError, RuntimeError):
    """A deployed organisation failed; the message is :func:`report_failure`'s, its error stays in its log."""


class MessageRefused(FedembedError, ValueError):
    """A coordinator message this organisation will not act on (it says why, in a signed reply)."""


def normaliser_upload_rule(nc: Mapping[str, Any]) -> bool:
    """Whether a node config lets the organisation upload its Adam normaliser (``normaliser-upload``, default true)."""
    return node_flag(nc, "normaliser-upload", True)


def _checked_plan(organisation: Organisation, content: RecordDict, message_type: str) -> RoundPlan:
    """The plan of a ``train``/``evaluate`` message, once everything this organisation holds itself agrees with it.

    Raises
    ------
    MessageRefused, ConfigError, SpecError
        Records outside the message's schema (a head, say), a plan outside its schema, a
        federation whose tables differ from this organisation's model, a plan whose
        evaluate flag contradicts the message type, a recipe below its own DP floor
        (:class:`fedembed.dp.policy.DPPolicy`), a row-set mode its policy excludes, a
        training recipe that has it upload its Adam normaliser when it does not.
    """
    from fedembed.secagg.client import TRAIN_RECORDS

    allowed = MESSAGE_RECORDS | (set(TRAIN_RECORDS) if message_type == "train" else set())
    extra = sorted(set(content.keys()) - allowed)
    if extra:  # e.g. a head: this organisation's head is its own and never taken from a message
        raise MessageRefused(f"a {message_type!r} message with records outside its schema: {extra}")
    plan = RoundPlan.from_config(content["config"])
    if not plan.delta_clip > 0:  # finite already (every number of a message config is, StageHeader.from_config)
        raise ConfigError(f"message config field 'delta_clip' must be a finite number > 0, got {plan.delta_clip!r}")
    secure_records = sorted(set(content.keys()) & set(TRAIN_RECORDS))
    if secure_records and not plan.secure:
        raise MessageRefused(f"a plain {message_type!r} message with secure-aggregation records: {secure_records}")
    federation = FederationSpec.from_json(plan.federation)
    organisation.check_federation(federation)
    plan.shares(federation.shapes())  # the guard's twin's step: checked before anything runs
    if plan.evaluate_only != (message_type == "evaluate"):
        raise MessageRefused(f"a {message_type!r} message whose plan says evaluate_only={plan.evaluate_only}")
    recipe = plan.recipe()
    recipe.at_round(plan.round)  # its learning rates this round: a round so late they decay to 0 is refused here
    organisation.limits.check(recipe)  # no recipe keeps it busy for hours or takes its memory
    organisation.dp_policy.check(
        recipe.dp_active_noise_multiplier,
        (f"noise multiplier (dp_noise_multiplier {recipe.dp_noise_multiplier:g} with dp_selection_noise_multiplier "
         f"{recipe.dp_selection_noise_multiplier:g}, as its ledger charges them)") if recipe.dp else
        "dp_sum_noise_multiplier" if recipe.dp_distributed else "dp_noise_multiplier")
    if recipe.dp_distributed and not (plan.secure and plan.row_set == "dense"):
        raise MessageRefused(  # its share alone would carry 1/m of the noise; other row sets release U without noise
            f"distributed DP noise needs a secure round over the dense row set, got secure={plan.secure}, "
            f"row set {plan.row_set!r}")
    if message_type == "train" and not organisation.normaliser_upload:
        carried = sorted(recipe.pooled_tables(federation.shapes()))
        if carried:
            raise MessageRefused(
                f"the recipe has it upload its Adam normaliser of table(s) {carried} (the pooled normaliser): this "
                f"organisation does not (normaliser-upload false); a federation can set pooled_normaliser_rows 0")
    if message_type == "train":  # before its sync touches anything: a round answered is never re-run
        check_round_open(organisation.state.dir, plan.run_key, plan.round)
    if plan.secure and plan.row_set not in organisation.policy.row_sets:
        raise MessageRefused(
            f"row-set mode {plan.row_set!r}: this organisation takes part in {list(organisation.policy.row_sets)}"
        )
    if not plan.secure:
        check_plain_allowed(organisation)
    return plan


def check_plain_allowed(organisation: Organisation) -> None:
    """Refuse a plain round (its update, row ids and all, in the clear) where this organisation's own rules forbid one.

    Its policy may forbid plain rounds outright (``require_secure``:
    :attr:`fedembed.secagg.protocol.SecurePolicy.plain_allowed`). And
    once it has contributed to a secure sum it stays secure, in every run: the run key does
    not say whether a run is secure and is the coordinator's to choose, so a coordinator
    could otherwise turn the next round plain, or rename the run, and get the update in
    the clear (:func:`fedembed.store.contributed_securely`).

    Raises
    ------
    MessageRefused
        Naming the rule.
    """
    if not organisation.policy.plain_allowed:
        raise MessageRefused("a plain round: this organisation takes part in secure rounds only (--require-secure); "
                             "a plain round would send its update, row ids and all, in the clear")
    if contributed_securely(organisation.state.dir):
        raise MessageRefused("a plain round after this organisation has contributed to a secure sum: its update would "
                             "go in the clear, and the run key is the coordinator's to choose, so it holds for every "
                             "run; to take part in a plain federation, start it on a new state directory")


def _secure_records(organisation: Organisation, plan: RoundPlan, content: RecordDict, update: RowUpdate,
                    shapes: dict[str, tuple[int, int]]) -> dict:
    """The secure part of a ``train`` reply (:mod:`fedembed.secagg.client`).

    A session started with this round: its advert, the update kept on disk. A session set
    up ahead (the message brings its shares): the update masked now. Either way, when the
    plan asks, the advert of the next round's session, and when the message brings the next
    round's share request (sessions that unmask early), its shares and the advert of the
    session after it (:func:`fedembed.secagg.client.next_shares`); in ``union``/``revealed`` mode the
    rows claimed for U are the rows it touched and the rows its training data looks up
    (the next round's, agreed ahead).
    """
    from fedembed.secagg.client import advertise_next, begin, encode_rows, mask_in_train, next_shares
    from fedembed.workingset import training_rows

    cfg = plan.recipe()
    member = organisation.member
    encoding = (plan.delta_clip, cfg.max_row_weight, plan.wire_dtype)
    noise = DistributedNoise.for_recipe(cfg, shapes, plan.delta_clip)  # distributed DP: a share before masking
    rows: dict[str, np.ndarray] = {}
    if plan.row_set != "dense":
        rows = {n: tu.ids.astype(np.int64) for n, tu in update.items()}
        if not cfg.dp:  # DP releases rows drawn each round: no U is agreed ahead, only the round's own rows count
            for name, ids in training_rows(organisation.task).items():
                rows[name] = np.union1d(rows.get(name, np.zeros(0, np.int64)), ids)
    if "secagg" in content:  # the session was set up ahead: mask the update in this reply
        check_drop(plan.drop, "masked", plan.round, organisation.org)
        if plan.row_set == "union":
            check_drop(plan.drop, "indicators", plan.round, organisation.org)
        records = mask_in_train(member, plan.run_key, plan.round, plan.row_set, content, update, rows, shapes, *encoding,
                                dp_noise=noise, early_unmask=plan.early_unmask)
        if plan.row_set == "revealed":
            records["rows"] = encode_rows(rows)
    else:
        records = begin(member, plan.run_key, plan.round, plan.row_set, update, shapes, *encoding, rows=rows,
                        dp_noise=noise)
    if "next" in content:  # the next round's share request (its session unmasks early: no later message this round)
        check_drop(plan.drop, "share", plan.round + 1, organisation.org)
        records.update(next_shares(member, plan.run_key, plan.round + 1, content["next"]))
    if plan.next_session:
        records["next"] = advertise_next(member, plan.run_key, plan.round + 1, plan.row_set, shapes, *encoding,
                                         dp_noise=noise, early_unmask=plan.early_unmask)
    return records


def report_failure(exc: BaseException, disclose: bool, what: str = "") -> str:
    """Log an organisation's failure in full, in its own log; return what it tells the coordinator.

    The log line has the whole error (with its traceback, unless the organisation's own task
    broke its contract: a :class:`fedembed.task.TaskError` names its fault). The returned
    reason is the whole error in a simulation, its kind in a deployment: a deployed
    organisation's error text may quote its own task or data (an exception of its task
    code, a row of its files), and no part of it is the coordinator's to read, so the reply
    names only the error's type (a coordinator that provoked the failure learns that it
    did, as from a missing reply). A fault in the coordinator's message itself
    (:class:`MessageRefused`, a config outside its schema:
    :class:`fedembed.config.ConfigError`) is told in full: it quotes only what the
    coordinator sent. In a simulation every organisation is the user's, so the reason is the
    error itself (:class:`fedembed.coordinator.RunFailed` quotes it). ``what`` prefixes the
    log line (the message type).
    """
    log.error("%s%s", f"{what}: " if what else "", exc, exc_info=not isinstance(exc, TaskError))
    if disclose or isinstance(exc, MessageRefused | ConfigError):  # about the coordinator's own message: its to read
        return str(exc)[:2000]
    if isinstance(exc, TaskError):
        return "its own task failed (TaskError); the fault is in the organisation's log"
    return f"it failed ({type(exc).__name__}); the error is in the organisation's log"


def handle_content(organisation: Organisation, content: RecordDict, message_type: str, node: int,
                   divergence_fails: bool = False) -> RecordDict:
    """Decode a coordinator message, run the stage, encode and sign the reply (no Flower process needed).

    Parameters
    ----------
    organisation : Organisation
        Who answers.
    content : RecordDict
        The coordinator's message content (``config``, ``sync``; or a secure stage's
        records, see :mod:`fedembed.secagg.client`).
    message_type : str
        The Flower message type: ``train``, ``evaluate`` or ``train.<secure stage>``; the
        one thing that picks the handler.
    node : int
        This organisation's Flower node id (bound into the reply's signature).
    divergence_fails : bool
        Training that turns non-finite raises its :class:`fedembed.train.NonFiniteError`
        instead of being refused: in a simulation every organisation is the user's, and
        a recipe that diverges is the run's error (:class:`fedembed.coordinator.RunFailed`),
        not a round of refusals that leaves the tables where they were. Nothing is kept
        either way.

    Returns
    -------
    RecordDict
        ``info``, ``metrics``, ``train`` and ``update``; in
        secure mode the signed key advertisement instead of ``update``, and each secure
        stage's own records; always the ``sig`` record (:func:`fedembed.identity.sign_reply`).

    Raises
    ------
    fedembed.faults.SimulatedDropout
        When the run's injected dropouts name this organisation at this stage.
    ValueError
        A message of an unknown type, or one whose config names no run and round (there
        is nothing to sign a refusal for). Any other message this organisation will not
        act on gets a signed reply of status ``refused`` with the reason
        (:class:`MessageRefused`, :class:`fedembed.config.ConfigError`,
        :class:`fedembed.spec.SpecError`, a recipe with a non-finite number:
        :class:`fedembed.recipe.RecipeError`, a sync with one:
        :class:`fedembed.sparse.UpdateError`), and so does a stage whose training would
        leave its head non-finite (:class:`fedembed.train.NonFiniteError`: nothing kept).
    """
    if message_type.startswith("train."):
        from fedembed.secagg.client import handle_message

        return handle_message(organisation.member, message_type.partition(".")[2], content, node)
    if message_type not in ("train", "evaluate"):
        raise MessageRefused(f"unknown message type {message_type!r}")
    header = StageHeader.from_config(content["config"], header_only=True)  # without a run and a round there is nothing to sign for
    def refuse(exc: Exception) -> RecordDict:
        log.warning("%s: refused the %s message of round %d: %s", organisation.identity.name, message_type, header.round, exc)
        refusal = RecordDict({"info": ConfigRecord({"status": "refused", "error": str(exc)[:1000]})})
        return sign_reply(refusal, organisation.identity, header.run_key, header.round, message_type, node)

    try:
        plan = _checked_plan(organisation, content, message_type)
        # its metrics, once per round of a run (an oracle on its held-out labels otherwise), and at most max-runs runs
        check_evaluation_open(organisation.state.dir, plan.run_key, plan.round, organisation.max_runs)
    except (FedembedError, ValueError, KeyError, TypeError) as exc:  # refused before anything is loaded or trained, and signed: the coordinator knows who
        return refuse(exc)
    # the closing evaluation is its own stage: a dropout injected at "train" never hits it
    check_drop(plan.drop, "evaluate" if plan.evaluate_only else "train", plan.round, organisation.org)
    shapes = {n: t.shape for n, t in organisation.table_specs().items()}
    # what its upload is laid out over: twice as wide for the tables that carry its normaliser (fedembed.normaliser)
    upload = upload_shapes(shapes, plan.recipe().pooled_tables(shapes))
    try:
        sync = decode_sync(content["sync"], shapes) if "sync" in content else {}
        reply = organisation.handle(plan, sync)
    except TaskError as exc:  # its own task is broken: no refusal of the message, a failure it names itself
        raise TaskError(f"organisation {organisation.identity.name!r}: {exc}") from exc
    except NonFiniteError as exc:  # a recipe or sync that made its head or tables non-finite (nothing of it kept)
        if divergence_fails:
            raise
        return refuse(exc)
    except (UpdateError, SyncRefused, DPError) as exc:  # a sync that contradicts itself or what this organisation
        # holds; a DP recipe its task cannot follow (no privacy units for dp_unit user)
        return refuse(exc)
    from fedembed.secagg.client import claim_evaluation  # under the organisation's lock

    try:  # recorded before its metrics leave
        claim_evaluation(organisation.state.dir, plan.run_key, plan.round, organisation.max_runs)
    except RoundAnswered as exc:
        return refuse(exc)
    secure = plan.secure and reply.update is not None and reply.status == "ok"
    record = None
    if reply.update is not None and not secure:
        from fedembed.secagg.client import claim_round  # under the organisation's lock

        try:  # one update per round, in increasing rounds, as for a secure round's contribution
            claim_round(organisation.state.dir, plan.run_key, plan.round)
        except RoundAnswered as exc:
            return refuse(exc)
        record = encode_update(reply.update, upload, plan.wire_dtype)
    metrics = {k: v for k, v in reply.metrics.items() if np.isfinite(v)}
    if len(metrics) != len(reply.metrics):
        log.warning("%s: non-finite metrics not reported: %s", organisation.identity.name, sorted(set(reply.metrics) - set(metrics)))
    out = reply_content(reply.status, reply.cache_version, record, metrics, reply.train_stats)
    if reply.request is not None and not plan.evaluate_only:  # its own choice of rows, signed with the rest
        digest = request_digest(reply.request)
        # the request the coordinator holds already (its plan names it): 32 bytes say "the same"
        same = plan.request == digest.hex() and reply.status == "ok"
        out["want"] = encode_request_digest(digest) if same else encode_request(reply.request, shapes)
    if secure:
        try:
            for key, rec in _secure_records(organisation, plan, content, reply.update, upload).items():
                out[key] = rec
        except SimulatedDropout:
            raise
        except (FedembedError, ValueError, KeyError, TypeError) as exc:  # nothing masked leaves; the refusal says why
            return refuse(MessageRefused(f"{type(exc).__name__}: {exc}"))
    return sign_reply(out, organisation.identity, plan.run_key, plan.round, message_type, node)
