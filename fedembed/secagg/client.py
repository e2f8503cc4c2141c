"""An organisation's side of the secure stages, between Flower records and the protocol.

The ``train`` stage (local training, in :mod:`fedembed.org`) ends with :func:`begin`: the
row-sparse update is kept in the organisation's private state directory together with the
session's keys, and only the key advertisement (and, in ``revealed`` mode, the row ids)
goes back. Each later stage (:func:`handle_stage`) reloads the session, does its step and
saves it; the session is deleted after the last unmask. Nothing here holds state in memory
between messages, so it works the same in simulation (a new worker per message) and in
deployment, and survives a restart of the organisation's process.

Message layout (``RecordDict`` keys; large arrays in ``ArrayRecord``, which Flower chunks):

==================== ============================================ ======================================
stage                coordinator sends                            organisation replies
==================== ============================================ ======================================
train                config, sync                                 info, metrics, train, ``secagg``
                                                                  (advert), ``rows`` (revealed mode)
share                config, ``secagg`` (party, t, neighbours'    info, ``shares`` (dst -> ciphertext)
                     adverts)
indicators           config, ``secagg`` (U2), ``shares``          info, ``masked`` (uint8 counters)
unmask_indicators    config, ``secagg`` (alive, dropped)          info, ``unmask`` (shares)
masked               config, ``secagg`` (U2), ``shares`` (first   info, ``masked`` (uint32 values)
                     phase only), ``rowset`` (union/revealed)
unmask               config, ``secagg`` (alive, dropped)          info, ``unmask`` (shares)
==================== ============================================ ======================================
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedembed.faults import check_drop
from fedembed.secagg.primitives import CryptoError
from fedembed.secagg.protocol import ClientSession, ProtocolError, session_context
from fedembed.secagg.vector import (
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

STAGE_PHASE = {"indicators": "indicators", "unmask_indicators": "indicators", "masked": "values", "unmask": "values"}
SECURE_STAGES = ("share", "indicators", "unmask_indicators", "masked", "unmask")


def phases_for(row_set: str) -> list[str]:
    """Phases of a session in ``row_set`` mode."""
    return ["indicators", "values"] if row_set == "union" else ["values"]


def _dir(state_dir: Path) -> Path:
    return Path(state_dir) / "secagg"


def _save(state_dir: Path, session: ClientSession, update: RowUpdate | None = None) -> None:
    d = _dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
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
        raise UpdateError("the secure-aggregation session on disk belongs to another round")
    update: RowUpdate = {}
    for key in arrays:
        name, _, fld = key.rpartition(".")
        if fld == "ids":
            update[name] = TableUpdate(arrays[f"{name}.ids"], arrays[f"{name}.delta"], arrays[f"{name}.weight"])
    return session, update


def begin(state_dir: Path, run_key: str, round_: int, row_set: str, update: RowUpdate) -> dict:
    """Start a session after local training; returns the records to add to the train reply.

    Parameters
    ----------
    state_dir : Path
        The organisation's private state directory (the update and keys stay there).
    run_key, round_ : str, int
        Bind the session to the run and round.
    row_set : str
        ``dense``, ``union`` or ``revealed``.
    update : RowUpdate
        The local update.
    """
    session = ClientSession.new(session_context(run_key, round_), phases_for(row_set))
    _save(state_dir, session, update)
    out = {"secagg": ConfigRecord(session.advert())}
    if row_set == "revealed":
        out["rows"] = encode_arrays({name: tu.ids.astype(np.int64) for name, tu in update.items()})
    return out


def handle_stage(state_dir: Path, stage: str, cfg: dict, content: RecordDict, shapes: dict) -> dict:
    """Run one secure stage for an organisation; returns the records of its reply.

    Parameters
    ----------
    state_dir : Path
        The organisation's private state directory.
    stage : str
        One of :data:`SECURE_STAGES`.
    cfg : dict
        The stage's config record (``run_key``, ``round``, ``n``, ``clip_delta``,
        ``max_weight``, ``wire_dtype``, ``row_set``).
    content : RecordDict
        The coordinator's message.
    shapes : dict
        Table shapes of the task.

    Raises
    ------
    UpdateError, fedembed.secagg.protocol.ProtocolError, fedembed.secagg.protocol.ShareError
        Whatever makes the stage impossible; the organisation then leaves the round.
    """
    if stage not in SECURE_STAGES:
        raise UpdateError(f"unknown secure stage {stage!r}")
    context = session_context(str(cfg["run_key"]), int(cfg["round"]))
    session, update = _load(state_dir, context)
    sec = content["secagg"]
    out: dict = {}
    if stage == "share":
        party, threshold = int(sec["party"]), int(sec["threshold"])
        neighbours: dict[int, dict[str, bytes]] = {}
        for key in sec.keys():
            if key.startswith("adv."):
                _, q, fld = key.split(".", 2)
                neighbours.setdefault(int(q), {})[fld] = bytes(sec[key])
        cts = session.make_shares(party, threshold, neighbours)
        out["shares"] = ConfigRecord({str(q): ct for q, ct in cts.items()})
    elif stage in ("indicators", "masked"):
        if "shares" in content:
            session.accept_shares(
                [int(q) for q in sec["u2"]], {int(k): bytes(v) for k, v in content["shares"].items()}
            )
        n = int(cfg["n"])
        if stage == "indicators":
            vector = indicator_vector(update, shapes, n)
        else:
            if "rowset" in content:
                rowset = {k: v.astype(np.int64) for k, v in decode_arrays(content["rowset"]).items()}
                for name in shapes:
                    rowset.setdefault(name, np.zeros(0, np.int64))
                check_rowset(rowset, shapes)
            else:
                rowset = dense_rowset(shapes)
            scales = ValueScales(n=n, clip_delta=float(cfg["clip_delta"]), max_weight=float(cfg["max_weight"]))
            vector, clipped = encode_values(update, rowset, shapes, scales, str(cfg["wire_dtype"]))
            if clipped:
                log.warning("secure aggregation: %d delta entries beyond +-%g were clipped", clipped, scales.clip_delta)
        out["masked"] = encode_arrays({"vector": session.mask_vector(STAGE_PHASE[stage], vector)})
    else:  # unmask stages
        revealed = session.unmask(
            STAGE_PHASE[stage], [int(q) for q in sec.get("alive", [])], [int(q) for q in sec.get("dropped", [])]
        )
        out["unmask"] = ConfigRecord(dict(revealed))
    if stage == "unmask":
        shutil.rmtree(_dir(state_dir), ignore_errors=True)  # the round's secrets are spent
    else:
        _save(state_dir, session)
    return out


def handle_message(state_dir: Path, org: int, content: RecordDict) -> RecordDict:
    """An organisation's reply to a secure-stage message (everything but ``train``).

    Light on purpose: it needs neither the task nor torch (the table shapes travel in the
    stage's config), so a stage costs a deployed organisation no model or data loading.

    Parameters
    ----------
    state_dir : Path
        The organisation's private state directory.
    org : int
        Its index (for injected dropouts).
    content : RecordDict
        The coordinator's message.

    Raises
    ------
    fedembed.faults.SimulatedDropout
        When the run's injected dropouts name this organisation at this stage.
    """
    cfg = dict(content["config"])
    stage = str(cfg["stage"])
    check_drop(str(cfg.get("drop", "{}")), stage, int(cfg["round"]), org)
    try:
        shapes = {k: (int(v[0]), int(v[1])) for k, v in json.loads(str(cfg["shapes"])).items()}
        records = handle_stage(state_dir, stage, cfg, content, shapes)
    except (UpdateError, ProtocolError, CryptoError, KeyError, TypeError, ValueError) as exc:
        log.warning("organisation %d: secure stage %s failed: %s", org, stage, exc)
        return RecordDict({"info": ConfigRecord({"status": "error", "error": str(exc)})})
    return RecordDict({"info": ConfigRecord({"status": "ok"}), **records})
