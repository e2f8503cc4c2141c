"""An organisation's side of the secure stages, between Flower records and the protocol.

A secure round aggregates the round's update in one SecAgg+ session
(:mod:`fedembed.secagg.protocol`), bound to the run and the round. Sessions reach an
organisation two ways (the coordinator's choice, :mod:`fedembed.secagg.server`; the
organisation holds either to the same rules):

- **started with its round** (the first round, and whenever the parties change): the
  ``train`` reply carries the session's signed key advertisement (:func:`begin`; the
  update is kept in the organisation's private state directory, never sent in the clear),
  then ``train.share``, then per group of phases a mask, a check and an unmask stage
  (``union``: ``indicators``, ``check_indicators``, ``unmask_indicators``, then
  ``masked``, ``check``, ``unmask``; ``dense``/``revealed``: ``masked``, ``check``,
  ``unmask``);
- **set up ahead**, during the previous round (:func:`advertise_next` in the previous
  ``train`` reply; its share stage rides on the previous round's ``train.check`` message,
  :func:`handle_stage`): then the round's own ``train`` message brings the routed shares
  (and the row set U the values are summed over), and the organisation masks its update in
  the ``train`` reply itself (:func:`mask_in_train`); ``train.check`` and
  ``train.unmask`` finish it (two or three round trips a round), or, where the check
  cannot matter and the session says so, the ``train`` reply carries the seed shares too
  (early unmask: one round trip), and the ``train`` message the next round's share request
  (:func:`next_shares`). In ``union`` mode that session
  also sums the indicators of the rows the organisation's training data looks up
  (:func:`fedembed.workingset.training_rows`): the next round's U.

Each session lives in ``<state-dir>/secagg/<round>/`` (``session.json``, and for a session
started with its round the kept update, ``update.npz``), 0600 in 0700. Every stage
reloads it under a file lock, checks that this stage is the one it expects next, does its
step and saves it before the reply leaves; the session is deleted after its last unmask,
and sessions of other rounds are deleted when a round's ``train`` message comes. Every
session parameter (row-set mode, clip, weight cap, wire dtype, the organisation's own
table shapes) is fixed when the session is made, from the organisation's own training;
a round whose plan differs from the session it was set up with is refused. Nothing here
holds state in memory between messages, so it works the same in simulation and in
deployment, and survives a restart of the organisation.

The stage is the Flower message type (``train.<stage>``); a stage message's config is a
:class:`fedembed.config.StageHeader` (``run_key`` and ``round``, which must name a session
on disk, and, in tests and demos, injected dropouts). Message layout (``RecordDict`` keys;
large arrays in ``ArrayRecord``, which Flower chunks):

==================== ============================================ ======================================
stage                coordinator sends                            organisation replies
==================== ============================================ ======================================
train                config, sync; set up ahead: ``secagg``        info, metrics, train, ``secagg``
                     (u2), ``shares``, ``share_sigs``, ``rowset``  (advert: started with its round) or
                     (union/revealed); ``next`` (the next round's  ``masked`` + ``complaints`` (set up
                     share request, early unmask)                 ahead) + ``unmask`` (early); ``next``
                                                                  (advert of the next round's session)
                                                                  or ``next_shares``, ``next_share_sigs``,
                                                                  ``next_advert`` (early); ``rows``
                                                                  (revealed)
share                ``secagg`` (u1, t, k, neighbours' signed      ``shares``, ``share_sigs`` (dst ->
                     adverts ``adv.<q>.<field>``)                 ciphertext, signature)
indicators / masked  ``secagg`` (u2), ``shares``, ``share_sigs``  ``masked`` (``<phase>``: uint8
                     (first group), ``rowset`` (values, union/    counters / uint32 values),
                     revealed)                                    ``complaints`` (first group)
check_indicators /   ``secagg`` (u3); ``next`` (the next round's  ``check`` (``<phase>``: signature);
check                share request, as ``share``'s ``secagg``)    ``next_shares``, ``next_share_sigs``
                                                                  or ``next_error``
unmask_indicators /  ``secagg`` (``sig.<phase>.<party>``: the     ``unmask`` (``<phase>.<kind>.<party>``:
unmask               others' consistency signatures; or ``u3``    shares); ``next_*`` as for check
                     and ``fast`` when the check is skipped);
                     ``next`` when the check was skipped
==================== ============================================ ======================================

Every reply also carries the organisation's ``sig`` record (:func:`fedembed.identity.sign_reply`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedembed.config import StageHeader
from fedembed.dp.distributed import DistributedNoise
from fedembed.dp.noise import SecureRandom, noise_secret
from fedembed.errors import FedembedError
from fedembed.faults import check_drop
from fedembed.identity import Identity, sign_reply
from fedembed.secagg.protocol import (
    ClientSession,
    ProtocolError,
    SecurePolicy,
    ahead_groups,
    blob,
    fresh_groups,
    group_stage,
    rowset_digest,
    session_context,
)
from fedembed.secagg.vector import (
    RowSet,
    ValueScales,
    check_rowset,
    dense_rowset,
    encode_values,
    rows_indicator,
)
from fedembed.sparse import RowUpdate, TableUpdate, UpdateError
from fedembed import store
from fedembed.store import atomic_write, atomic_write_npz
from fedembed.wire import decode_arrays, encode_arrays

log = logging.getLogger(__name__)

SECURE_STAGES = ("share", "indicators", "check_indicators", "unmask_indicators", "masked", "check", "unmask")
STAGE_KIND = {
    "share": "share", "indicators": "mask", "masked": "mask", "check_indicators": "check", "check": "check",
    "unmask_indicators": "unmask", "unmask": "unmask",
}
"""What each secure stage does to a session."""

TRAIN_RECORDS = ("secagg", "shares", "share_sigs", "rowset", "next")
"""Records a ``train`` message may carry for a session set up ahead (besides its plan and sync)."""


@dataclass(frozen=True)
class SecureMember:
    """What an organisation brings to a secure stage: no task, no torch.

    Parameters
    ----------
    org : int
        Its index (injected dropouts only).
    state_dir : Path
        Its private state directory.
    identity : Identity
        Its roster name, identity key and roster.
    policy : SecurePolicy
        The rules it holds every session to.
    noise_seed : str, optional
        Seed of its DP noise (tests, reproducible simulations); None: its own secret key
        in ``state_dir`` (:func:`fedembed.dp.noise.noise_secret`).
    """

    org: int
    state_dir: Path
    identity: Identity
    policy: SecurePolicy
    noise_seed: str | None = None

    @classmethod
    def from_node_config(
        cls, nc: Mapping[str, Any], state_root: str | None = None, key_dir: str | None = None,
        roster: str | None = None,
    ) -> SecureMember:
        """The organisation a SuperNode's node config describes.

        Parameters
        ----------
        nc : mapping
            Node config: ``state-dir``, ``identity-key``, ``roster``, the ``secure-*``
            policy keys, optionally ``dp-noise-seed``, and, in simulation, ``partition-id``
            (or ``org``: an index used for fault injection and default file names; -1 when absent).
        state_root, key_dir, roster : str or None
            Simulation defaults: state in ``<state_root>/org-<index>``, key
            ``<key_dir>/<index>.key``, this roster file.

        Raises
        ------
        ValueError
            The node config lacks an entry; the message names the one to pass.
        """
        org = int(nc["org"]) if "org" in nc else int(nc["partition-id"]) if "partition-id" in nc else -1
        if "state-dir" in nc:
            state = Path(str(nc["state-dir"]))
        elif state_root is not None:
            state = Path(state_root) / f"org-{org}"
        else:
            raise ValueError("node config has no state-dir: pass --node-config 'state-dir=<dir> ...'")
        if "identity-key" in nc:
            key = Path(str(nc["identity-key"]))
        elif key_dir is not None:
            key = Path(key_dir) / f"{org}.key"
        else:
            raise ValueError("node config has no identity-key: pass --node-config '... identity-key=<private key file>'")
        roster_path = str(nc["roster"]) if "roster" in nc else roster
        if roster_path is None:
            raise ValueError("node config has no roster: pass --node-config '... roster=<dir of .pub files or JSON>'")
        seed = str(nc["dp-noise-seed"]) if str(nc.get("dp-noise-seed", "")) else None
        return cls(org, state, Identity.load(key, roster_path), SecurePolicy.from_mapping(nc), seed)


# ------------------------------------------------------------------ sessions on disk
def _root(state_dir: Path) -> Path:
    return Path(state_dir) / "secagg"


def _dir(state_dir: Path, round_: int) -> Path:
    return _root(state_dir) / str(int(round_))


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One stage at a time per organisation (two deliveries of one message cannot both pass the order check)."""
    d = _root(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(d / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _save(state_dir: Path, round_: int, session: ClientSession, update: RowUpdate | None = None,
          rows: Mapping[str, np.ndarray] | None = None) -> None:
    d = _dir(state_dir, round_)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if update is not None:
        arrays = {}
        for name, tu in update.items():
            arrays[f"{name}.ids"], arrays[f"{name}.delta"], arrays[f"{name}.weight"] = tu.ids, tu.delta, tu.weight
        for name, ids in (rows or {}).items():
            arrays[f"{name}.rows"] = np.asarray(ids, dtype=np.int64)
        atomic_write_npz(d / "update.npz", arrays)
    atomic_write(d / "session.json", session.to_json().encode())


def _load(state_dir: Path, context: bytes, round_: int) -> tuple[ClientSession, RowUpdate | None, dict[str, np.ndarray]]:
    """The session of ``round_`` and, for a session started with its round, its kept update and rows.

    Raises
    ------
    UpdateError
        No session of that round on disk (never made, finished, or lost).
    ProtocolError
        The session on disk belongs to another run.
    """
    d = _dir(state_dir, round_)
    try:
        session = ClientSession.from_json((d / "session.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise UpdateError(f"no secure-aggregation session of round {round_} on disk ({exc}); the organisation lost it "
                          "or never made it") from exc
    if session.context != context:
        raise ProtocolError("the message names another run or round than the secure-aggregation session on disk")
    update: RowUpdate | None = None
    rows: dict[str, np.ndarray] = {}
    if (d / "update.npz").exists():
        try:
            with np.load(d / "update.npz") as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise UpdateError(f"the update kept for round {round_} cannot be read ({exc})") from exc
        update = {}
        for key in arrays:
            name, _, fld = key.rpartition(".")
            if fld == "ids":
                update[name] = TableUpdate(arrays[f"{name}.ids"], arrays[f"{name}.delta"], arrays[f"{name}.weight"])
            elif fld == "rows":
                rows[name] = arrays[key]
    return session, update, rows


def claim_round(state_dir: Path, run_key: str, round_: int) -> None:
    """:func:`fedembed.store.claim_round` under the organisation's lock, for a plain round's update."""
    with _locked(state_dir):
        store.claim_round(state_dir, run_key, round_)


def claim_evaluation(state_dir: Path, run_key: str, round_: int, max_runs: int = 0) -> None:
    """:func:`fedembed.store.claim_evaluation` under the organisation's lock (a ``train`` or ``evaluate`` message)."""
    with _locked(state_dir):
        store.claim_evaluation(state_dir, run_key, round_, max_runs)


def _discard(state_dir: Path, keep: Callable[[int], bool]) -> None:
    """Delete the sessions whose round ``keep`` rejects (their secrets are never needed again)."""
    root = _root(state_dir)
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit() and not keep(int(d.name)):
            shutil.rmtree(d, ignore_errors=True)


def _params(member: SecureMember, row_set: str, shapes: Mapping[str, tuple[int, int]], clip_delta: float,
            max_weight: float, wire_dtype: str, dp_noise: DistributedNoise | None = None,
            early_unmask: bool = False) -> dict:
    """The session parameters, from the organisation's own training, checked against its policy.

    ``dp_noise``: distributed DP (:mod:`fedembed.dp.distributed`), a discrete Gaussian share
    added to the value vector before masking, fixed with the rest. ``early_unmask``: a
    session set up ahead whose seed shares go with the masked update (:func:`mask_in_train`).

    Raises
    ------
    ProtocolError
        A row-set mode its policy does not allow, unusable encoding parameters, or
        distributed noise with a row set other than ``dense`` (the row set would be
        released without noise).
    """
    if row_set not in member.policy.row_sets:
        raise ProtocolError(f"row-set mode {row_set!r} refused: this organisation takes part in {member.policy.row_sets}")
    if not (clip_delta > 0 and max_weight >= 1 and wire_dtype in ("float16", "float32")):
        raise ProtocolError(f"session parameters refused: clip {clip_delta}, weight cap {max_weight}, dtype {wire_dtype!r}")
    if dp_noise is not None and row_set != "dense":
        raise ProtocolError(f"distributed DP noise with row-set mode {row_set!r} refused: the row set would be "
                            "released without noise; use --row-set dense")
    params = {"row_set": row_set, "clip_delta": float(clip_delta), "max_weight": float(max_weight),
              "wire_dtype": wire_dtype, "shapes": {k: [int(v[0]), int(v[1])] for k, v in sorted(shapes.items())},
              "early_unmask": bool(early_unmask)}
    if dp_noise is not None:
        params["dp_noise"] = dp_noise.to_dict()
    return params


def _shapes(session: ClientSession) -> dict[str, tuple[int, int]]:
    return {k: (int(v[0]), int(v[1])) for k, v in session.params["shapes"].items()}


def encode_rows(rows: Mapping[str, np.ndarray]) -> Any:
    """The ``rows`` record of a ``revealed`` reply: sorted row ids per table (int64)."""
    return encode_arrays({name: np.unique(np.asarray(ids, dtype=np.int64)) for name, ids in rows.items()})


# ------------------------------------------------------------------ the train stage
def begin(
    member: SecureMember,
    run_key: str,
    round_: int,
    row_set: str,
    update: RowUpdate,
    shapes: dict[str, tuple[int, int]],
    clip_delta: float,
    max_weight: float,
    wire_dtype: str,
    rows: Mapping[str, np.ndarray] | None = None,
    dp_noise: DistributedNoise | None = None,
) -> dict:
    """Start the round's session after local training; returns the records to add to the train reply.

    Parameters
    ----------
    member : SecureMember
        The organisation (state directory, identity, policy).
    run_key, round_ : str, int
        Bind the session to the run and round.
    row_set : str
        ``dense``, ``union`` or ``revealed``; refused unless the policy allows it.
    update : RowUpdate
        The local update (kept on disk, never sent in the clear).
    shapes : dict
        The organisation's own table shapes.
    clip_delta, max_weight, wire_dtype : float, float, str
        The encoding of the value vector, fixed for the whole session.
    rows : dict, optional
        The rows it claims for U (``union``: its indicators; ``revealed``: told in the
        clear): the rows it touched and the rows its training data looks up, so the same U
        also serves a next round set up ahead. Default: the rows it touched.
    dp_noise : DistributedNoise, optional
        Distributed DP: the discrete Gaussian share added to the value vector before
        masking (:mod:`fedembed.dp.distributed`), fixed for the session; ``dense`` only.

    Raises
    ------
    ProtocolError
        A row-set mode the organisation's policy does not allow, or distributed noise
        with a row set other than ``dense`` (the row set would be released without noise).
    """
    params = _params(member, row_set, shapes, clip_delta, max_weight, wire_dtype, dp_noise)
    claimed = _claimed_rows(update, rows)
    session = ClientSession.new(session_context(run_key, round_), fresh_groups(row_set), params)
    advert = session.advert(member.identity)
    with _locked(member.state_dir):
        store.claim_round(member.state_dir, run_key, round_, secure=True)
        _discard(member.state_dir, lambda r: False)  # a session started with its round replaces any earlier one
        _save(member.state_dir, round_, session, update, claimed)
    out = {"secagg": ConfigRecord(advert)}
    if row_set == "revealed":
        out["rows"] = encode_rows(claimed)
    return out


def _claimed_rows(update: RowUpdate, rows: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    out = {name: np.asarray(tu.ids, dtype=np.int64) for name, tu in update.items()}
    for name, ids in (rows or {}).items():
        out[name] = np.union1d(out.get(name, np.zeros(0, np.int64)), np.asarray(ids, dtype=np.int64))
    return out


def advertise_next(
    member: SecureMember,
    run_key: str,
    round_: int,
    row_set: str,
    shapes: dict[str, tuple[int, int]],
    clip_delta: float,
    max_weight: float,
    wire_dtype: str,
    dp_noise: DistributedNoise | None = None,
    early_unmask: bool = False,
) -> ConfigRecord:
    """Make the session of ``round_`` (the next round) ahead of time; its signed advert, the train reply's ``next``.

    Its parameters are fixed now, from this round's training; the next round's plan must
    agree with them (:func:`mask_in_train` refuses otherwise). ``dp_noise``: as in
    :func:`begin`, fixed with the session; ``early_unmask``: see :func:`mask_in_train`.
    """
    params = _params(member, row_set, shapes, clip_delta, max_weight, wire_dtype, dp_noise, early_unmask)
    with _locked(member.state_dir):
        return ConfigRecord(_new_ahead(member, run_key, round_, params))


def _new_ahead(member: SecureMember, run_key: str, round_: int, params: dict) -> dict[str, bytes | str]:
    """Make (and save) the session of ``round_`` with ``params``; its signed advert. Under the lock."""
    session = ClientSession.new(session_context(run_key, round_), ahead_groups(str(params["row_set"])), params)
    advert = session.advert(member.identity)
    _discard(member.state_dir, lambda r: r < round_)  # never two sessions for one round
    _save(member.state_dir, round_, session)
    return advert


def mask_in_train(
    member: SecureMember,
    run_key: str,
    round_: int,
    row_set: str,
    content: RecordDict,
    update: RowUpdate,
    rows: Mapping[str, np.ndarray],
    shapes: dict[str, tuple[int, int]],
    clip_delta: float,
    max_weight: float,
    wire_dtype: str,
    dp_noise: DistributedNoise | None = None,
    early_unmask: bool = False,
) -> dict:
    """Mask the round's update in the session set up ahead for it; the records of the train reply.

    The ``train`` message brings U2 and the shares routed to this organisation (and, in
    ``union``/``revealed`` mode, the row set U): the shares are opened, the values vector
    is encoded over U (which must hold every row it touched), ``union`` adds the indicators
    of ``rows`` (the next round's U), and the group is masked. The update never touches
    the disk. With distributed DP noise (``dp_noise``, fixed when the session was made)
    the values vector carries the organisation's discrete Gaussian share.

    With ``early_unmask`` (fixed when the session was made), the reply also carries the
    organisation's seed shares of every party that shared (``unmask``), so the coordinator
    can finish the sum without another round trip, if the conditions under which the
    consistency check cannot matter hold (:meth:`ClientSession.unmask_fast`, with U3 = U2:
    the whole roster, a complete graph, a threshold over half the roster plus colluders).
    The session is then spent: no mask-key share of it is ever revealed, so a party that
    does not deliver leaves masks nobody can remove and the round is abandoned, never
    recovered. If a condition does not hold, the reply carries the masked update only and
    the round goes on with the check and the unmask stages.

    Raises
    ------
    ProtocolError, UpdateError
        No session set up for the round, a plan whose parameters differ from the ones the
        session was made with, or a stage out of order. (Rows it touched that U lacks are
        left out of its update, not refused: see :func:`_within`.)
    """
    params = _params(member, row_set, shapes, clip_delta, max_weight, wire_dtype, dp_noise, early_unmask)
    context = session_context(run_key, round_)
    with _locked(member.state_dir):
        session, _, _ = _load(member.state_dir, context, round_)
        fixed = {k: session.params.get(k) for k in params}  # what the session was made with (it adds U's digest later)
        if session.groups != ahead_groups(row_set) or fixed != params:
            changed = sorted(k for k in params if params[k] != fixed[k])
            raise ProtocolError(
                f"the round's plan differs from the session set up for it ({changed or 'groups'}): parameters are "
                "fixed when a session is made"
            )
        store.claim_round(member.state_dir, run_key, round_, secure=True)
        out = _mask(member, session, content, update, rows, session.groups[0])
        early = _unmask_early(member, session) if session.params.get("early_unmask") else None
        if early is not None:
            out["unmask"] = early
            shutil.rmtree(_dir(member.state_dir, round_), ignore_errors=True)  # spent: nothing more is revealed
        else:
            _save(member.state_dir, round_, session)
    return out


def _unmask_early(member: SecureMember, session: ClientSession) -> ConfigRecord | None:
    """The seed shares of a session set up ahead, sent with the masked update; None where that is not safe.

    Exactly :meth:`ClientSession.unmask_fast` with U3 taken to be this organisation's own U2:
    it checks the session's parties (the whole roster), the graph (complete), the
    threshold and the policy's floor (:func:`_session_policy`: with distributed noise, no
    sum of fewer vectors than its shares count on) from what the session fixed, never from
    the message, and moves the session past its check and unmask stages, so no later
    message can get a mask-key share of it.
    """
    group = session.group
    extras = {p: bytes.fromhex(session.params.get("rowset_digest", "")) if p == "values" else b"" for p in group}
    try:
        shares = session.unmask_fast(member.identity, _session_policy(member.policy, session), list(session.u2), extras)
    except ProtocolError as exc:
        log.info("%s: no early unmask in this session (%s); the check and unmask stages will follow",
                 member.identity.name, exc)
        return None
    return ConfigRecord({f"{phase}.{k}": v for phase, d in shares.items() for k, v in d.items()})


def _mask(member: SecureMember, session: ClientSession, content: RecordDict, update: RowUpdate | None,
          rows: Mapping[str, np.ndarray], group: list[str]) -> dict:
    """Open the shares (first group), encode and mask the group's vectors; the reply records."""
    sec = content["secagg"] if "secagg" in content else ConfigRecord({})
    out: dict = {}
    if group == session.groups[0]:  # the first group opens the shares
        cts, sigs = (content[k] if k in content else ConfigRecord({}) for k in ("shares", "share_sigs"))
        routed = {int(q): (blob(cts[q], f"party {q}'s share ciphertext"), blob(sigs.get(q, b""), f"party {q}'s share signature"))
                  for q in cts.keys()}
        complaints = session.accept_shares(member.identity.roster, _party_list(sec.get("u2"), "u2"), routed)
        if complaints:
            out["complaints"] = ConfigRecord({str(q): why for q, why in complaints.items()})
    p = session.params
    shapes = _shapes(session)
    vectors = {}
    for phase in group:
        if phase == "indicators":
            vectors[phase] = rows_indicator(rows, shapes, session.n)
            continue
        if update is None:
            raise UpdateError("no update to mask in this session")
        rowset = _rowset(content, session)
        update = _within(update, rowset, member.identity.name)
        session.params["rowset_digest"] = rowset_digest(rowset).hex()
        noise = DistributedNoise(**p["dp_noise"]) if "dp_noise" in p else None
        scales = ValueScales(n=session.n, clip_delta=p["clip_delta"], max_weight=p["max_weight"], noise=noise)
        rng = None
        if noise is not None:  # its own secret noise share, bound to this session
            rng = SecureRandom.derive(noise_secret(member.state_dir, member.noise_seed), "distributed",
                                      member.identity.name, session.context.hex())
        vectors[phase], clipped = encode_values(update, rowset, p["shapes"], scales, p["wire_dtype"], rng)
        if clipped:
            log.warning("secure aggregation: %d delta entries beyond +-%g were clipped", clipped, scales.clip_delta)
    out["masked"] = encode_arrays(session.mask_group(vectors))
    return out


def _party_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ProtocolError(f"{what} must be a list of party ids")
    return [int(x) for x in value]


def _adverts(sec: ConfigRecord) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for key in sec.keys():
        if key.startswith("adv."):
            _, q, fld = key.split(".", 2)
            out.setdefault(int(q), {})[fld] = sec[key]
    return out


def _rowset(content: RecordDict, session: ClientSession) -> RowSet:
    """The values phase's row set U: all rows (dense) or the coordinator's (checked against the session's shapes)."""
    shapes = _shapes(session)
    if session.params["row_set"] == "dense":
        return dense_rowset(shapes)
    if "rowset" not in content:
        raise ProtocolError("the values phase needs the row set U")
    rowset = {k: v.astype(np.int64) for k, v in decode_arrays(content["rowset"]).items()}
    for name in shapes:
        rowset.setdefault(name, np.zeros(0, np.int64))
    check_rowset(rowset, shapes)
    return rowset


def _within(update: RowUpdate, rowset: RowSet, name: str) -> RowUpdate:
    """``update`` without the rows U lacks; how many were left out goes to this organisation's log only.

    U can lack rows it touched: a cancelled indicator (a hostile organisation), a
    coordinator leaving them out, rows its data did not look up when U was agreed. The
    vector is masked over U all the same, and the reply looks as it always does: a refusal,
    or a count in it, would tell the coordinator whether the U it chose missed a row this
    organisation touched, one answer per U it tries (group testing recovers which rows the
    organisation touched, what ``union`` mode promises to hide).
    """
    out: RowUpdate = {}
    for table, tu in update.items():
        keep = np.isin(tu.ids, rowset.get(table, np.zeros(0, np.int64)))
        if not keep.all():
            log.warning("%s: secure aggregation: %d of the %d rows we touched in table %r are not in the row set U "
                        "(a cancelled indicator, a coordinator leaving them out, or rows our data did not look up when "
                        "U was agreed): their update is left out of this round", name, int((~keep).sum()),
                        tu.ids.size, table)
            tu = TableUpdate(tu.ids[keep], tu.delta[keep], tu.weight[keep])
        out[table] = tu
    return out


def _make_shares(member: SecureMember, session: ClientSession, sec: Mapping[str, Any]) -> dict:
    k = sec.get("k")
    threshold = sec.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ProtocolError(f"threshold must be an integer, got {threshold!r}")
    shares = session.make_shares(
        member.identity, member.policy, _party_list(sec.get("u1"), "u1"), threshold, _adverts(sec), k,  # type: ignore[arg-type]
    )
    return {
        "shares": ConfigRecord({str(q): ct for q, (ct, _) in shares.items()}),
        "share_sigs": ConfigRecord({str(q): sig for q, (_, sig) in shares.items()}),
    }


# ------------------------------------------------------------------ the stages after train
def handle_stage(member: SecureMember, stage: str, content: RecordDict) -> dict:
    """Run one secure stage for an organisation; returns the records of its reply.

    Parameters
    ----------
    member : SecureMember
        The organisation.
    stage : str
        One of :data:`SECURE_STAGES` (from the Flower message type).
    content : RecordDict
        The coordinator's message.

    Raises
    ------
    UpdateError, fedembed.secagg.protocol.ProtocolError
        Whatever makes the stage impossible or breaks the protocol; nothing is revealed.
        A ``next`` part (the next round's share, on a check message) that fails does not
        fail the stage: its reason goes back in ``next_error``.
    """
    if stage not in SECURE_STAGES:
        raise ProtocolError(f"unknown secure stage {stage!r}")
    kind = STAGE_KIND[stage]
    header = StageHeader.from_config(content["config"])
    extra = sorted(set(content.keys()) - {"config", "secagg", "shares", "share_sigs", "rowset", "next"})
    if extra:
        raise ProtocolError(f"a {stage!r} message with records outside its schema: {extra}")
    has_next = "next" in content
    if has_next and kind not in ("check", "unmask"):
        raise ProtocolError(f"only a check or unmask message may carry the next round's share request, not {stage!r}")
    if "secagg" not in content and not has_next:
        raise ProtocolError(f"a {stage!r} message with nothing to answer")
    out: dict = {}
    with _locked(member.state_dir):
        if "secagg" in content:
            out.update(_session_stage(member, stage, kind, header, content))
        if has_next:
            out.update(_next_shares(member, header.run_key, header.round + 1, content["next"]))
    return out


def next_shares(member: SecureMember, run_key: str, round_: int, request: ConfigRecord) -> dict:
    """Answer the share request of ``round_``'s session (set up ahead), carried by a message of the round before.

    The reply records: ``next_shares``, ``next_share_sigs`` and, when the session unmasks
    early (:func:`mask_in_train`), ``next_advert``: the signed advert of the session after
    it (round ``round_ + 1``), made now with the same parameters, so that its share request
    can ride on ``round_``'s own ``train`` message and a round is one round trip. A request
    that fails does not fail the message: its reason goes back in ``next_error``.
    """
    with _locked(member.state_dir):
        return _next_shares(member, run_key, round_, request)


def _next_shares(member: SecureMember, run_key: str, round_: int, request: ConfigRecord) -> dict:
    out: dict = {}
    try:
        session, _, _ = _load(member.state_dir, session_context(run_key, round_), round_)
        out.update({f"next_{k}": v for k, v in _make_shares(member, session, request).items()})
        _save(member.state_dir, round_, session)
        if session.params.get("early_unmask"):
            params = {k: v for k, v in session.params.items() if k != "rowset_digest"}
            out["next_advert"] = ConfigRecord(_new_ahead(member, run_key, round_ + 1, params))
    except (FedembedError, KeyError, TypeError, ValueError) as exc:
        log.warning("%s: the share request of round %d's session refused: %s", member.identity.name, round_, exc)
        return {"next_error": ConfigRecord({"error": f"{type(exc).__name__}: {exc}"[:1000]})}
    return out


def _session_policy(policy: SecurePolicy, session: ClientSession) -> SecurePolicy:
    """The policy a session is held to: with distributed DP noise, no sum of fewer vectors than its shares count on.

    Each organisation adds ``1/m`` of the noise variance (:mod:`fedembed.dp.distributed`):
    a sum of fewer than ``m`` honest shares would carry less noise than its ledger
    records, so it helps unmask none with fewer than ``m + colluders`` vectors.
    """
    if "dp_noise" not in session.params:
        return policy
    shares = int(session.params["dp_noise"]["shares"])
    return replace(policy, min_delivered=max(policy.min_delivered, shares + policy.colluders))


def _session_stage(member: SecureMember, stage: str, kind: str, header: StageHeader, content: RecordDict) -> dict:
    """The part of a stage message that belongs to the round's own session (under the lock)."""
    context = session_context(header.run_key, header.round)
    session, update, rows = _load(member.state_dir, context, header.round)
    sec = content["secagg"]
    ident, policy = member.identity, _session_policy(member.policy, session)
    out: dict = {}
    if kind == "share":
        out.update(_make_shares(member, session, sec))
    elif kind == "mask":
        group = session.group
        if group_stage(group, "mask") != stage:
            raise ProtocolError(f"stage {stage!r} refused: this session expects {session.next_stage!r} next")
        out.update(_mask(member, session, content, update, rows, group))
    elif kind == "check":
        group = session.group
        extras = {p: bytes.fromhex(session.params.get("rowset_digest", "")) if p == "values" else b"" for p in group}
        if group_stage(group, "check") != stage:
            raise ProtocolError(f"stage {stage!r} refused: this session expects {session.next_stage!r} next")
        sigs = session.sign_group_check(ident, policy, _party_list(sec.get("u3"), "u3"), extras)
        out["check"] = ConfigRecord(dict(sigs))
    elif sec.get("fast"):  # unmask without the consistency check (the protocol decides whether that is safe)
        group = session.group
        if group_stage(group, "unmask") != stage:
            raise ProtocolError(f"stage {stage!r} refused: this session expects {session.next_stage!r} next")
        extras = {p: bytes.fromhex(session.params.get("rowset_digest", "")) if p == "values" else b"" for p in group}
        shares = session.unmask_fast(ident, policy, _party_list(sec.get("u3"), "u3"), extras)
        out["unmask"] = ConfigRecord({f"{phase}.{k}": v for phase, d in shares.items() for k, v in d.items()})
    else:  # unmask
        group = session.group
        if group_stage(group, "unmask") != stage:
            raise ProtocolError(f"stage {stage!r} refused: this session expects {session.next_stage!r} next")
        signatures: dict[str, dict[int, bytes]] = {p: {} for p in group}
        for key in sec.keys():
            if key.startswith("sig."):
                _, phase, party = key.split(".", 2)
                if phase in signatures:
                    signatures[phase][int(party)] = blob(sec[key], f"check signature {key!r}")
        shares = session.unmask_group(ident, policy, signatures)
        out["unmask"] = ConfigRecord({f"{phase}.{k}": v for phase, d in shares.items() for k, v in d.items()})
    if session.next_stage is None:
        shutil.rmtree(_dir(member.state_dir, header.round), ignore_errors=True)  # the round's secrets are spent
    else:
        _save(member.state_dir, header.round, session)
    return out


def handle_message(member: SecureMember, stage: str, content: RecordDict, node: int) -> RecordDict:
    """An organisation's signed reply to a secure-stage message (everything but ``train``).

    Light on purpose: it needs neither the task nor torch, so a stage costs a deployed
    organisation no model or data loading. A refused stage is a signed ``error`` reply
    naming the fault; nothing of the session is revealed.

    Parameters
    ----------
    member : SecureMember
        The organisation.
    stage : str
        The stage (the Flower message type without ``train.``).
    content : RecordDict
        The coordinator's message.
    node : int
        This organisation's Flower node id (bound into the reply's signature).

    Raises
    ------
    fedembed.faults.SimulatedDropout
        When the run's injected dropouts name this organisation at this stage (or, for a
        message carrying the next round's share request, at that round's ``share``).
    """
    header = StageHeader.from_config(content["config"], header_only=True)  # what a refusal is signed for
    run_key, round_ = header.run_key, header.round
    if "secagg" in content or "next" not in content:
        check_drop(header.drop, stage, round_, member.org)
    if "next" in content:
        check_drop(header.drop, "share", round_ + 1, member.org)
    try:
        StageHeader.from_config(content["config"])  # a stage's config holds the header and nothing else
        records = handle_stage(member, stage, content)
        reply = RecordDict({"info": ConfigRecord({"status": "ok"}), **records})
    except (FedembedError, KeyError, TypeError, ValueError) as exc:
        log.warning("%s: secure stage %s of round %d refused: %s", member.identity.name, stage, round_, exc)
        reply = RecordDict({"info": ConfigRecord({"status": "error", "error": f"{type(exc).__name__}: {exc}"})})
    return sign_reply(reply, member.identity, run_key, round_, f"train.{stage}", node)


def add_secure_stages(app: Any, state_root: str | None = None, key_dir: str | None = None, roster: str | None = None,
                      before: Callable[[Any, Any], Any] | None = None) -> None:
    """Register the secure stages (message types ``train.<stage>``) on a Flower ``ClientApp``.

    The Flower-native organisation half of fedembed's secure sparse aggregation, usable
    from a Flower user's own ClientApp: each stage loads the organisation (state dir,
    identity, policy: :meth:`SecureMember.from_node_config`) and answers with
    :func:`handle_message`; no task and no torch are loaded. The ``train`` handler itself
    (local training) stays the app's own and ends with :func:`begin` (or, for a session
    set up ahead, :func:`mask_in_train`, and :func:`advertise_next`).

    Parameters
    ----------
    app : flwr.clientapp.ClientApp
        The app to register on.
    state_root, key_dir, roster : str, optional
        Simulation defaults (see :meth:`SecureMember.from_node_config`).
    before : callable, optional
        ``before(message, context) -> Message | None``: a reply from elsewhere (the
        organisation worker) that short-cuts the stage when not None.
    """
    from flwr.app import Message

    def secure_stage(msg: Message, context: Any) -> Message:
        if before is not None and (reply := before(msg, context)) is not None:
            return reply
        member = SecureMember.from_node_config(context.node_config, state_root, key_dir, roster)
        stage = msg.metadata.message_type.partition(".")[2]
        return Message(handle_message(member, stage, msg.content, context.node_id), reply_to=msg)

    for stage in SECURE_STAGES:
        app.train(stage)(secure_stage)
