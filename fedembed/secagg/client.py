"""An organisation's side of the secure stages, between Flower records and the protocol.

The ``train`` stage (local training, in :mod:`fedembed.org`) ends with :func:`begin`: the
row-sparse update is kept in the organisation's private state directory together with the
session's keys and its fixed parameters (row-set mode, clip, weight cap, wire dtype, its
own table shapes), and only the signed key advertisement (and, in ``revealed`` mode, the
row ids) goes back. Each later stage (:func:`handle_stage`) reloads the session under a
file lock, checks that this stage is the one the session expects next, does its step and
saves it before the reply leaves; the session is deleted after the last unmask. Nothing
here holds state in memory between messages, so it works the same in simulation (a new
worker per message) and in deployment, and survives a restart of the organisation.

The stage is the Flower message type (``train.<stage>``); a message's config is a
:class:`fedembed.config.StageHeader` (the header every ``train`` plan starts with too):
``run_key`` and ``round`` (which must name the session on disk) and, in tests and demos,
injected dropouts. Every other parameter was fixed when the session started.

Message layout (``RecordDict`` keys; large arrays in ``ArrayRecord``, which Flower chunks):

==================== ============================================ ======================================
stage                coordinator sends                            organisation replies
==================== ============================================ ======================================
train                config, sync                                 info, metrics, train, ``secagg``
                                                                  (signed advert), ``rows`` (revealed)
share                ``secagg`` (u1, t, neighbours' signed        ``shares``, ``share_sigs`` (dst ->
                     adverts ``adv.<q>.<field>``)                 ciphertext, signature)
indicators / masked  ``secagg`` (u2), ``shares``, ``share_sigs``  ``masked`` (uint8 counters / uint32
                     (first phase), ``rowset`` (values phase,     values), ``complaints`` (first phase:
                     union/revealed)                              sender -> why its share failed)
check_indicators /   ``secagg`` (u3)                              ``check`` (signature of the statement)
check
unmask_indicators /  ``secagg`` (``sig.<party>``: the others'     ``unmask`` (shares)
unmask               consistency signatures)
==================== ============================================ ======================================

Every reply also carries the organisation's ``sig`` record (:func:`fedembed.identity.sign_reply`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedembed.config import StageHeader
from fedembed.errors import FedembedError
from fedembed.faults import check_drop
from fedembed.identity import Identity, sign_reply
from fedembed.secagg.protocol import (
    CHECK_STAGE,
    MASK_STAGE,
    UNMASK_STAGE,
    ClientSession,
    ProtocolError,
    RowsMissing,
    SecurePolicy,
    phases_for,
    rowset_digest,
    session_context,
)
from fedembed.secagg.vector import (
    RowSet,
    ValueScales,
    check_rowset,
    dense_rowset,
    encode_values,
    indicator_vector,
)
from fedembed.sparse import RowUpdate, TableUpdate, UpdateError
from fedembed.store import atomic_write, atomic_write_npz
from fedembed.wire import decode_arrays, encode_arrays

log = logging.getLogger(__name__)

SECURE_STAGES = ("share", "indicators", "check_indicators", "unmask_indicators", "masked", "check", "unmask")
PHASE_OF = {s: p for table in (MASK_STAGE, CHECK_STAGE, UNMASK_STAGE) for p, s in table.items()}


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
    """

    org: int
    state_dir: Path
    identity: Identity
    policy: SecurePolicy

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
            policy keys, and, in simulation, ``partition-id`` (or ``org``: an index used
            for fault injection and default file names; -1 when absent).
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
        return cls(org, state, Identity.load(key, roster_path), SecurePolicy.from_mapping(nc))


def _dir(state_dir: Path) -> Path:
    return Path(state_dir) / "secagg"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One stage at a time per organisation (two deliveries of one message cannot both pass the order check)."""
    d = _dir(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(d / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _save(state_dir: Path, session: ClientSession, update: RowUpdate | None = None) -> None:
    d = _dir(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if update is not None:
        arrays = {}
        for name, tu in update.items():
            arrays[f"{name}.ids"], arrays[f"{name}.delta"], arrays[f"{name}.weight"] = tu.ids, tu.delta, tu.weight
        atomic_write_npz(d / "update.npz", arrays)
    atomic_write(d / "session.json", session.to_json().encode())


def _load(state_dir: Path, context: bytes) -> tuple[ClientSession, RowUpdate]:
    d = _dir(state_dir)
    try:
        session = ClientSession.from_json((d / "session.json").read_text())
        with np.load(d / "update.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as exc:
        raise UpdateError(f"no secure-aggregation session on disk ({exc}); the organisation lost it") from exc
    if session.context != context:
        raise ProtocolError("the message names another run or round than the secure-aggregation session on disk")
    update: RowUpdate = {}
    for key in arrays:
        name, _, fld = key.rpartition(".")
        if fld == "ids":
            update[name] = TableUpdate(arrays[f"{name}.ids"], arrays[f"{name}.delta"], arrays[f"{name}.weight"])
    return session, update


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
) -> dict:
    """Start a session after local training; returns the records to add to the train reply.

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

    Raises
    ------
    ProtocolError
        A row-set mode the organisation's policy does not allow.
    """
    if row_set not in member.policy.row_sets:
        raise ProtocolError(f"row-set mode {row_set!r} refused: this organisation takes part in {member.policy.row_sets}")
    if not (clip_delta > 0 and max_weight >= 1 and wire_dtype in ("float16", "float32")):
        raise ProtocolError(f"session parameters refused: clip {clip_delta}, weight cap {max_weight}, dtype {wire_dtype!r}")
    params = {"row_set": row_set, "clip_delta": float(clip_delta), "max_weight": float(max_weight),
              "wire_dtype": wire_dtype, "shapes": {k: [int(v[0]), int(v[1])] for k, v in shapes.items()}}
    session = ClientSession.new(session_context(run_key, round_), phases_for(row_set), params)
    advert = session.advert(member.identity)
    with _locked(member.state_dir):
        _save(member.state_dir, session, update)
    out = {"secagg": ConfigRecord(advert)}
    if row_set == "revealed":
        out["rows"] = encode_arrays({name: tu.ids.astype(np.int64) for name, tu in update.items()})
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


def _rowset(content: RecordDict, session: ClientSession, update: RowUpdate) -> RowSet:
    """The values phase's row set U: all rows (dense) or the coordinator's, which must hold every row we touched."""
    shapes = {k: (int(v[0]), int(v[1])) for k, v in session.params["shapes"].items()}
    if session.params["row_set"] == "dense":
        return dense_rowset(shapes)
    if "rowset" not in content:
        raise ProtocolError("the values phase needs the row set U")
    rowset = {k: v.astype(np.int64) for k, v in decode_arrays(content["rowset"]).items()}
    for name in shapes:
        rowset.setdefault(name, np.zeros(0, np.int64))
    check_rowset(rowset, shapes)
    for name, tu in update.items():
        missing = np.setdiff1d(tu.ids, rowset.get(name, np.zeros(0, np.int64)))
        if missing.size:
            raise RowsMissing(
                f"table {name!r}: {missing.size} rows we touched are missing from U (a cancelled indicator or a "
                "coordinator dropping our rows); refusing to send a vector that would lose them"
            )
    return rowset


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
    """
    if stage not in SECURE_STAGES:
        raise ProtocolError(f"unknown secure stage {stage!r}")
    header = StageHeader.from_config(content["config"])
    context = session_context(header.run_key, header.round)
    with _locked(member.state_dir):
        session, update = _load(member.state_dir, context)
        sec = content["secagg"] if "secagg" in content else ConfigRecord({})
        out: dict = {}
        ident, policy, phase = member.identity, member.policy, PHASE_OF.get(stage)
        if stage == "share":
            shares = session.make_shares(
                ident, policy, _party_list(sec.get("u1"), "u1"), int(sec["threshold"]), _adverts(sec)
            )
            out["shares"] = ConfigRecord({str(q): ct for q, (ct, _) in shares.items()})
            out["share_sigs"] = ConfigRecord({str(q): sig for q, (_, sig) in shares.items()})
        elif stage == MASK_STAGE.get(phase):
            if stage == MASK_STAGE[session.phases[0]]:  # the first phase opens the shares
                cts, sigs = (content[k] if k in content else ConfigRecord({}) for k in ("shares", "share_sigs"))
                routed = {int(q): (bytes(cts[q]), bytes(sigs.get(q, b""))) for q in cts.keys()}
                complaints = session.accept_shares(ident.roster, _party_list(sec.get("u2"), "u2"), routed)
                if complaints:
                    out["complaints"] = ConfigRecord({str(q): why for q, why in complaints.items()})
            p = session.params
            if phase == "indicators":
                vector = indicator_vector(update, p["shapes"], session.n)
            else:
                rowset = _rowset(content, session, update)
                session.params["rowset_digest"] = rowset_digest(rowset).hex()
                scales = ValueScales(n=session.n, clip_delta=p["clip_delta"], max_weight=p["max_weight"])
                vector, clipped = encode_values(update, rowset, p["shapes"], scales, p["wire_dtype"])
                if clipped:
                    log.warning("secure aggregation: %d delta entries beyond +-%g were clipped", clipped, scales.clip_delta)
            out["masked"] = encode_arrays({"vector": session.mask_vector(phase, vector)})
        elif stage == CHECK_STAGE.get(phase):
            extra = bytes.fromhex(session.params.get("rowset_digest", "")) if phase == "values" else b""
            sig = session.sign_check(ident, policy, phase, _party_list(sec.get("u3"), "u3"), extra)
            out["check"] = ConfigRecord({"signature": sig})
        else:  # unmask stages
            sigs = {int(k.split(".", 1)[1]): bytes(sec[k]) for k in sec.keys() if k.startswith("sig.")}
            out["unmask"] = ConfigRecord(dict(session.unmask(ident, policy, phase, sigs)))
        if session.next_stage is None:
            for f in ("session.json", "update.npz"):  # the round's secrets are spent
                (_dir(member.state_dir) / f).unlink(missing_ok=True)
        else:
            _save(member.state_dir, session)
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
        When the run's injected dropouts name this organisation at this stage.
    """
    header = StageHeader.from_config(content["config"], header_only=True)  # what a refusal is signed for
    run_key, round_ = header.run_key, header.round
    check_drop(header.drop, stage, round_, member.org)
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
    (local training) stays the app's own and ends with :func:`begin`.

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
