"""Run configuration (the coordinator's) and the per-round plan sent to organisations."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from fedembed.errors import FedembedError
from fedembed.recipe import TrainConfig
from fedembed.spec import FederationSpec

MODES = ("fedembed", "local", "fedavg-all", "pooled")
ROW_SETS = ("dense", "union", "revealed")
DROP_STAGES = ("train", "share", "indicators", "check_indicators", "unmask_indicators", "masked", "check", "unmask")


class ConfigError(FedembedError, ValueError):
    """A run configuration that cannot work."""


@dataclass
class RunConfig:
    """Everything that defines a run; the coordinator's source of truth.

    It holds no task: the organisations' data, models and code are theirs
    (:mod:`fedembed.task`); the coordinator knows the shared tables only.

    Parameters
    ----------
    federation : FederationSpec
        The shared tables (name, rows, dim, vocabulary digest) every organisation's model
        must match.
    rounds : int
        Federated rounds.
    mode : str
        ``fedembed`` (shared tables, private heads: the only mode a coordinator runs), or
        a baseline run in one process by :mod:`fedembed.baselines`: ``local`` (each
        organisation alone), ``fedavg-all`` (heads averaged too; identical heads only) or
        ``pooled`` (the same architecture trained centrally on all data: the upper bound).
    seed : int
        Seed of table initialisation, sampling, every organisation's first head and its local
        shuffling (both mixed with its name: :func:`fedembed.train.build_seeded`).
    fraction : float
        Share of organisations sampled per round.
    min_orgs : int
        Fewest organisations a round needs (fewer connected: wait; fewer replies: skip).
    train : TrainConfig
        Local recipe.
    server_optimizer : str
        How the coordinator applies each row's aggregate: ``sum`` (the default: the row
        moves by the sum of the deltas of the organisations that touched it, each counted
        up to ``TrainConfig.max_row_weight``: as far as centralised training would move
        it), ``sgd`` (by their weighted mean), ``adagrad``, ``adam`` or ``yogi`` (per-row
        adaptive steps); see :class:`fedembed.aggregate.ServerOptimizer`.
    server_lr : float
        The server optimizer's learning rate (``sgd`` with 1: the plain weighted mean).
    pooled_server_lr : float
        The server learning rate of the tables that carry the pooled normaliser
        (``TrainConfig.pooled_normaliser_rows``: by default the tables of at most 1,000
        rows), in place of ``server_lr``: such a table moves by half its normalised sum by
        default. Every organisation reads most rows of such a table many times an epoch,
        and keeping half of the round's move lifts the shared model there (link +0.007,
        20 seeds; README, "Does federating pay off?"). Under the linear server steps only
        (``sum``, ``sgd``): an adaptive one steps every table by ``server_lr``.
    table_scale : float
        Standard deviation of the seeded version-0 tables (every party regenerates them).
    wire_dtype : str
        ``float16`` or ``float32`` for uploaded deltas.
    secure : bool
        Secure aggregation on.
    row_set : str
        ``dense``, ``union`` or ``revealed`` (secure mode).
    neighbours, threshold : int or None
        SecAgg+ neighbourhood size k and Shamir threshold t out of the k + 1 share
        holders (the neighbours and the organisation itself); None: derived
        (:mod:`fedembed.secagg.graph`).
    secure_ahead : bool
        Set each secure round's session up during the previous round (its key
        advertisement and share exchange ride on that round's messages, and its U is
        agreed there), so a round is 2 round trips (train, unmask) or, with the
        consistency check, 3 (train, check, unmask) instead of 5 (dense, revealed) or 8
        (union); see :mod:`fedembed.secagg.server`.
    consistency_check : str
        ``auto`` (skip a group's consistency check where it cannot matter: every
        organisation of the roster in the session, a complete neighbour graph, nobody
        dropped; each organisation checks this itself, see
        :meth:`fedembed.secagg.protocol.ClientSession.unmask_fast`) or ``always``.
    early_unmask : bool
        With ``secure_ahead`` and ``consistency_check`` ``auto``: each organisation sends
        its seed shares with its masked update where the check cannot matter, and the next
        round's share request rides on the ``train`` message (sessions are set up two
        rounds ahead), so a steady secure round is **one round trip**. The price: no
        mask-key share of such a session is ever revealed, so an organisation that drops
        out of it after sharing makes the round be abandoned (tables unchanged) instead of
        recovered; the next round then starts its own session, and the rest of the run's
        sessions recover dropouts (2 round trips). Off: 2 round trips (train, unmask) with
        dropouts recovered from the start.
    max_message_bytes : int
        Replies larger than this are refused.
    round_timeout : float
        Seconds to wait for replies in a stage.
    delta_clip : float
        Largest ``|delta|`` of one table entry the aggregate takes as is; larger ones are
        clipped. Plain and secure rounds both sum ``weight * delta`` in the same exact
        fixed point, whose scale this sets (:mod:`fedembed.secagg.quantize`).
    drop : dict[str, list[int]]
        Injected dropouts (simulation, tests, demos): ``{"<stage>": [org, ...]}`` or
        ``{"<stage>@<round>": [...]}``; a listed organisation fails that stage's message
        as a vanished one would. Stages: ``train``, ``share``, ``indicators``,
        ``unmask_indicators``, ``masked``, ``unmask`` (and ``check_indicators``, ``check``).
    roster : dict[str, str]
        The federation's organisations: name -> OpenSSH public identity key
        (:class:`fedembed.identity.Roster`). Replies are attributed by these keys'
        signatures; ``fedembed simulate`` makes one, ``fedembed server`` reads it.
    """

    federation: FederationSpec
    rounds: int = 10
    mode: str = "fedembed"
    seed: int = 0
    fraction: float = 1.0
    min_orgs: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)
    server_optimizer: str = "sum"
    server_lr: float = 1.0
    pooled_server_lr: float = 0.5
    table_scale: float = 0.1
    wire_dtype: str = "float16"
    secure: bool = False
    row_set: str = "union"
    neighbours: int | None = None
    threshold: int | None = None
    secure_ahead: bool = True
    consistency_check: str = "auto"
    early_unmask: bool = True
    max_message_bytes: int = 512 * 2**20
    round_timeout: float = 600.0
    delta_clip: float = 4.0
    drop: dict[str, list[int]] = field(default_factory=dict)
    roster: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.row_set not in ROW_SETS:
            raise ConfigError(f"row_set must be one of {ROW_SETS}, got {self.row_set!r}")
        if self.consistency_check not in ("auto", "always"):
            raise ConfigError(f"consistency_check must be auto or always, got {self.consistency_check!r}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.wire_dtype not in ("float16", "float32"):
            raise ConfigError(f"wire_dtype must be float16 or float32, got {self.wire_dtype!r}")
        if self.secure and self.mode != "fedembed":
            raise ConfigError("--secure applies to --mode fedembed only")
        if not self.delta_clip > 0:
            raise ConfigError(f"delta_clip must be > 0, got {self.delta_clip}")
        for name in ("server_lr", "pooled_server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.train.dp_distributed and not (self.secure and self.row_set == "dense"):
            raise ConfigError(  # without masking each share is seen alone; other row sets release U without noise
                "distributed DP noise (dp_sum_noise_multiplier) needs --secure --row-set dense: without masking the "
                "coordinator sees every organisation's share of the noise, and the union or revealed row set would "
                "be released without noise")
        if self.neighbours is not None and self.neighbours < 1:
            raise ConfigError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.threshold is not None and self.threshold < 1:
            raise ConfigError(f"threshold must be >= 1, got {self.threshold}")
        if self.neighbours is not None and self.threshold is not None and self.threshold > self.neighbours + 1:
            raise ConfigError(f"threshold {self.threshold} exceeds the {self.neighbours + 1} share holders (k neighbours + self)")
        for key, orgs in self.drop.items():
            stage = key.partition("@")[0]
            if stage not in DROP_STAGES or not all(isinstance(o, int) for o in orgs):
                raise ConfigError(f"drop takes {{stage[@round]: [org indices]}} with stage in {DROP_STAGES}, got {key!r}")

    def run_key(self) -> str:
        """Identifies the tables of this run (federation spec, seed, init): guards organisation caches."""
        return json.dumps([self.federation.digest, self.seed, self.table_scale])

    def with_roster(self, roster: dict[str, str]) -> RunConfig:
        """This run with ``roster`` (name -> OpenSSH public key) as its organisations."""
        return replace(self, roster=dict(roster))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (metrics.json ``config``, checkpoints)."""
        d = asdict(self)
        d["federation"] = self.federation.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        d = dict(d)
        names = {f.name for f in fields(RunConfig)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown run settings {sorted(unknown)}")
        if "federation" not in d:
            raise ConfigError("a run config names its federation's tables ('federation')")
        federation = FederationSpec.from_dict(d.pop("federation"))
        train = TrainConfig.from_dict(d.pop("train", {}))
        return RunConfig(federation=federation, train=train, **d)


@dataclass(kw_only=True)
class StageHeader:
    """The ``config`` record of every message of a round: the run and round it belongs to.

    One schema for the whole message family: a ``train`` or ``evaluate`` message's config
    is a :class:`RoundPlan`, which starts with these fields; a secure stage's config
    (``train.<stage>``) is this header alone, since every other parameter of the session
    was fixed when it started (:mod:`fedembed.secagg.client`). Parsing checks every
    field's presence and type and ignores nothing silently.

    Parameters
    ----------
    round : int
        The round (1-based).
    run_key : str
        Identifies the run (:meth:`RunConfig.run_key`); replies are signed for it.
    drop : str
        Injected dropouts (JSON of :attr:`RunConfig.drop`; tests and demos).
    """

    round: int
    run_key: str
    drop: str = "{}"

    def to_config(self) -> dict[str, Any]:
        """Flat dict for a ``ConfigRecord``."""
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], header_only: bool = False) -> Any:
        """Parse a message's ``config`` record, refusing unknown, missing or mistyped fields.

        Parameters
        ----------
        cfg : Mapping
            The record.
        header_only : bool
            Read only this class's fields and pass over the others (to learn which run and
            round a message belongs to before it is parsed whole).

        Raises
        ------
        ConfigError
            Names the field and what is wrong with it (a number must be finite).
        """
        spec = {f.name: f for f in fields(cls)}
        unknown = sorted(set(cfg) - set(spec))
        if unknown and not header_only:
            raise ConfigError(f"message config has fields outside its schema: {unknown}")
        values = {}
        for name, f in spec.items():
            if name not in cfg:
                if f.default is MISSING:
                    raise ConfigError(f"message config lacks {name!r}")
                continue
            value = cfg[name]
            kind = _FIELD_TYPES[str(f.type)]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                wanted = "a number" if isinstance(kind, tuple) else kind.__name__
                raise ConfigError(f"message config field {name!r} must be {wanted}, got {type(value).__name__}")
            if kind is not bool and isinstance(value, float) and not math.isfinite(value):  # JSON carries NaN, Infinity
                raise ConfigError(f"message config field {name!r} must be a finite number, got {value!r}")
            values[name] = float(value) if kind is float else value
        return cls(**values)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "bool": bool, "float": (int, float)}


#: The largest share of an epoch's move an organisation lets a plan give its guard's twin (a server learning
#: rate of at most 2: the default steps are 1 and 0.5).
MAX_KEPT_SHARE = 2.0


@dataclass(kw_only=True)
class RoundPlan(StageHeader):
    """What the coordinator tells an organisation at the start of a ``train`` or ``evaluate`` stage.

    The :class:`StageHeader` fields (round, run key, dropouts) and:

    Parameters
    ----------
    since : int
        The version the coordinator assumes the organisation's cache holds; the sync
        carries every row changed after it (the tables sent are at version ``round - 1``).
    evaluate_only : bool
        Apply the sync and evaluate, do not train (the closing evaluation).
    request : str
        What the sync covers: empty, every row changed since ``since``; else the hex
        digest of the working set the organisation asked for in its last accepted reply,
        whose rows changed since ``since`` (and rows new to it) are all the sync holds
        (:meth:`fedembed.tables.VersionedTables.rows_requested`).
    next_session : bool
        Secure rounds: advertise keys for the next round's session in the reply (it is set
        up ahead, during this round; :mod:`fedembed.secagg.server`).
    early_unmask : bool
        Secure rounds: sessions set up ahead send their seed shares with the masked update
        (:attr:`RunConfig.early_unmask`); fixed in each session when it is made.
    kept_shares : str
        JSON of table -> the share of an epoch's move the coordinator's step keeps, for the
        tables where it is not 1 (:meth:`fedembed.aggregate.ServerOptimizer.kept_shares`):
        the guard's private twin steps its own tables so, as the ``local`` baseline does.
        It touches only the twin; :meth:`shares` checks it.
    """

    since: int
    evaluate_only: bool
    federation: str
    seed: int
    table_scale: float
    wire_dtype: str
    train: str
    secure: bool = False
    row_set: str = "union"
    delta_clip: float = 4.0
    request: str = ""
    next_session: bool = False
    early_unmask: bool = False
    kept_shares: str = "{}"

    @staticmethod
    def for_round(cfg: RunConfig, round_: int, since: int, evaluate_only: bool = False, request: str = "",
                  next_session: bool = False, early_unmask: bool = True,
                  kept_shares: Mapping[str, float] | None = None) -> RoundPlan:
        """The plan of ``round_`` for an organisation whose cache is at ``since`` (``request``: what its sync covers;
        ``next_session``: it advertises the next round's secure session; ``early_unmask``: False once the run
        has stopped unmasking early, :attr:`fedembed.secagg.server.SecurePipeline.early_unmask`; ``kept_shares``:
        the coordinator's step as a share of an epoch's move, per table where it is not 1)."""
        return RoundPlan(
            kept_shares=json.dumps(dict(sorted((kept_shares or {}).items()))),
            next_session=next_session,
            early_unmask=early_unmask and cfg.early_unmask and cfg.consistency_check == "auto",
            request=request,
            round=round_,
            since=since,
            evaluate_only=evaluate_only,
            federation=cfg.federation.to_json(),
            seed=cfg.seed,
            table_scale=cfg.table_scale,
            wire_dtype=cfg.wire_dtype,
            train=json.dumps(cfg.train.to_dict()),
            run_key=cfg.run_key(),
            secure=cfg.secure,
            row_set=cfg.row_set,
            drop=json.dumps(cfg.drop),
            delta_clip=cfg.delta_clip,
        )

    def recipe(self) -> TrainConfig:
        """The training recipe the plan carries (:attr:`train`, parsed; unknown keys ignored)."""
        return TrainConfig.from_dict(json.loads(self.train))

    def shares(self, tables: Collection[str]) -> dict[str, float]:
        """:attr:`kept_shares`, parsed and checked against the federation's ``tables``.

        Raises
        ------
        ConfigError
            Not a JSON object, a table outside the federation, or a share outside
            ``(0, MAX_KEPT_SHARE]``: a coordinator could otherwise have the twin's tables
            thrown far past their epoch's move, ruining the twin without a word.
        """
        try:
            shares = json.loads(self.kept_shares)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"kept_shares is not JSON: {exc}") from exc
        if not isinstance(shares, dict):
            raise ConfigError(f"kept_shares must map tables to shares, got {type(shares).__name__}")
        out: dict[str, float] = {}
        for table, share in shares.items():
            if table not in tables:
                raise ConfigError(
                    f"kept_shares names table {table!r}, which is not one of the federation's {sorted(tables)}")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= MAX_KEPT_SHARE:
                raise ConfigError(f"kept_shares of table {table!r} must be a number in (0, {MAX_KEPT_SHARE:g}], got {share!r}")
            out[table] = float(share)
        return out


def node_flag(nc: Mapping[str, Any], key: str, default: bool) -> bool:
    """A true/false entry of an organisation's own node config (Flower parses ``key=false`` to a bool).

    Raises
    ------
    ConfigError
        A value other than true or false.
    """
    value = str(nc.get(key, default)).strip().lower()
    if value not in ("true", "false"):
        raise ConfigError(f"node config {key} must be true or false, got {nc[key]!r}")
    return value == "true"


def node_int(nc: Mapping[str, Any], key: str, default: int) -> int:
    """An integer entry of an organisation's own node config (absent: ``default``).

    Raises
    ------
    ConfigError
        Anything but a whole number, naming the key.
    """
    value = nc.get(key, default)
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"node config {key} must be an integer, got {value!r}") from None
