"""An organisation's working set: which table rows it keeps fresh, and proof it never uses a stale one.

The coordinator's tables change every round, mostly in rows an organisation never looks
up. With its own :class:`SyncPolicy` an organisation asks, in its signed ``train`` reply
(record ``want``), for the rows its data can look up (its *working set*, from
:meth:`fedembed.task.Task.working_set` or, for a task without that hook, from one pass over
its data with the tables' lookups recorded); the next round's sync carries only those of
them that changed since its cache version, plus rows new to the set
(:meth:`fedembed.tables.VersionedTables.rows_requested`). The policy is the organisation's
own (node config ``sync``, ``fedembed client --sync``), never the coordinator's:

========== ===================================================================== =======================
mode       what the coordinator learns from the request                          default for
========== ===================================================================== =======================
full       nothing (every changed row is sent, as before)                        secure ``union``/``dense``
working-set its working set: the rows its training data looks up (its uploads     plain, secure ``revealed``
           show them every round anyway) and those only its held-out data looks
           up
padded     a superset of its working set of a fixed, coarse size (a power of     opt-in
           two >= ``pad`` x its size), the extra rows a fixed secret-keyed
           sample of the table, so repeating the request narrows nothing
========== ===================================================================== =======================

Locally the organisation keeps, per row, the version at which its cached value was last
known current and the coordinator's stamp of that value (:class:`RowState`, next to its
table cache). A row is fresh in a round whose tables are at version ``V`` when it was
confirmed at ``V``; :func:`lookup_guard` makes every lookup of a row that is not fresh an
error (:class:`StaleRowError`), so no evaluation and no training ever reads a stale row:
such a row joins the working set and is fetched by the next round's sync ("fetched on
first use"; the organisation sits that round out with status ``stale``). A sync is checked
against what the organisation holds: rows outside the set it asked for, stamps from the
future, a row rolled back to an older stamp, or an unchanged row resent are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedembed.errors import FedembedError
from fedembed.model import SplitModel
from fedembed.store import atomic_write, atomic_write_npz, file_sha256
from fedembed.tables import RowRequest, RowSync
from fedembed.task import SPLITS, Task

log = logging.getLogger(__name__)

SYNC_MODES = ("auto", "full", "working-set", "padded")
FULL, WORKING_SET, PADDED = "full", "working-set", "padded"


class SyncPolicyError(FedembedError, ValueError):
    """A sync policy that cannot work (unknown mode, pad below 1)."""


class SyncRefused(FedembedError, ValueError):
    """A row sync this organisation will not apply (it names what is wrong, in a signed refusal)."""


class StaleRowError(FedembedError, RuntimeError):
    """A table row was looked up whose cached value is not known to be current.

    Attributes
    ----------
    rows : dict[str, np.ndarray]
        The stale rows looked up, per table.
    """

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows
        n = sum(int(r.size) for r in rows.values())
        super().__init__(f"{n} stale table rows looked up ({', '.join(f'{k}: {v[:5].tolist()}' for k, v in rows.items())})")


@dataclass(frozen=True)
class SyncPolicy:
    """Which rows an organisation asks the coordinator to sync: its own choice, never the coordinator's.

    Parameters
    ----------
    mode : str
        ``auto`` (``full`` in secure ``union``/``dense`` rounds, which promise the
        coordinator learns nothing of an organisation's rows; ``working-set`` in plain and
        secure ``revealed`` rounds, whose uploads show the rows anyway), ``full``,
        ``working-set`` or ``padded`` (see the module docstring).
    pad : float
        ``padded`` only: the request holds at least ``pad`` x the working set's rows,
        rounded up to a power of two (at most the table).
    """

    mode: str = "auto"
    pad: float = 4.0

    def __post_init__(self) -> None:
        if self.mode not in SYNC_MODES:
            raise SyncPolicyError(f"sync must be one of {SYNC_MODES}, got {self.mode!r}")
        if not self.pad >= 1:
            raise SyncPolicyError(f"sync-pad must be >= 1, got {self.pad}")

    def resolve(self, secure: bool, row_set: str) -> str:
        """The mode in force for a round of this kind (``auto`` resolved)."""
        if self.mode != "auto":
            return self.mode
        return FULL if secure and row_set in ("union", "dense") else WORKING_SET

    @staticmethod
    def from_node_config(nc: Mapping[str, Any]) -> SyncPolicy:
        """The policy in a node config (``sync``, ``sync-pad``); absent keys keep the defaults."""
        kw: dict[str, Any] = {}
        if "sync" in nc:
            kw["mode"] = str(nc["sync"])
        if "sync-pad" in nc:
            try:
                kw["pad"] = float(nc["sync-pad"])
            except (TypeError, ValueError):
                raise SyncPolicyError(f"sync-pad must be a number, got {nc['sync-pad']!r}") from None
        return SyncPolicy(**kw)


# --------------------------------------------------------------------------- the working set


_DERIVED: weakref.WeakKeyDictionary[Task, dict[str, np.ndarray]] = weakref.WeakKeyDictionary()


def _as_rows(ids: Any, rows: int, what: str) -> np.ndarray:
    arr = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    if arr.size and (arr[0] < 0 or arr[-1] >= rows):
        raise SyncPolicyError(f"{what}: row ids outside [0, {rows})")
    return arr


def working_set(task: Task, shapes: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The rows of each shared table the organisation's data can look up: sorted, unique.

    From :meth:`fedembed.task.Task.working_set` when the task says; otherwise derived once
    per task object by :func:`derive_working_set`.

    Raises
    ------
    SyncPolicyError
        The task's working set names an unknown table or rows out of range.
    """
    declared = task.working_set()
    if declared is None:
        if task not in _DERIVED:
            _DERIVED[task] = derive_working_set(task)
        declared = _DERIVED[task]
    unknown = sorted(set(declared) - set(shapes))
    if unknown:
        raise SyncPolicyError(f"the task's working set names tables it does not share: {unknown}")
    return {n: _as_rows(declared.get(n, ()), s[0], f"working set of table {n!r}") for n, s in shapes.items()}


def training_rows(task: Task) -> dict[str, np.ndarray]:
    """The rows of each shared table the organisation's **training** data looks up (computed once per task object).

    What a secure ``union``/``revealed`` round set up ahead agrees its row set U on
    (:mod:`fedembed.secagg.server`): the rows this organisation will touch next round,
    known before it trains (one pass over the ``train`` split, lookups recorded).
    """
    if task not in _TRAINING:
        _TRAINING[task] = derive_working_set(task, ("train",))
    return _TRAINING[task]


_TRAINING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def derive_working_set(task: Task, splits: tuple[str, ...] = SPLITS) -> dict[str, np.ndarray]:
    """Every row the task's batches look up, over ``splits`` (default all; one pass, lookups recorded).

    The model's forward runs through :meth:`fedembed.task.Task.loss` on every batch of
    ``train``, ``val`` and ``test`` with a hook on each shared table recording the ids it
    is asked for; the ids of :meth:`fedembed.task.Task.id_bags` are added. A task whose
    code reads table rows some other way declares its rows in
    :meth:`fedembed.task.Task.working_set`; :func:`lookup_guard` catches any it forgets.
    """
    model = task.build_model()
    model.eval()
    seen: dict[str, list[np.ndarray]] = {n: [] for n in model.table_names}

    def recorder(name: str):
        def hook(_module, args, kwargs):
            ids = args[0] if args else kwargs.get("input")
            if isinstance(ids, torch.Tensor):
                seen[name].append(ids.detach().reshape(-1).cpu().numpy())
        return hook

    handles = [model.table(n).register_forward_pre_hook(recorder(n), with_kwargs=True) for n in model.table_names]
    try:
        for split in splits:
            if task.num_examples(split) == 0:
                continue
            for batch in task.batches(split, 1024, None):
                task.loss(model, batch)
                for name, (ids, _offsets) in task.id_bags(batch).items():
                    if name in seen:
                        seen[name].append(ids.reshape(-1).cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return {n: np.unique(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64) for n, v in seen.items()}


def decoy_key(state_dir: Path) -> bytes:
    """This organisation's secret for choosing padding rows (made once, kept in its state dir)."""
    path = Path(state_dir) / "sync-decoys.key"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except OSError:
        pass
    key = secrets.token_bytes(32)
    atomic_write(path, key)
    return key


def padded(rows_wanted: np.ndarray, rows: int, pad: float, key: bytes, table: str) -> np.ndarray:
    """``rows_wanted`` padded to ``min(rows, 2**ceil(log2(pad * n)))`` rows with secret-keyed decoys.

    The decoys are the first rows of one fixed permutation of the table keyed by ``key``
    (not in ``rows_wanted``), so the same working set always gives the same request and
    asking again reveals nothing new.
    """
    n = int(rows_wanted.size)
    if n == 0:
        return rows_wanted
    target = min(rows, 1 << int(np.ceil(np.log2(max(pad * n, 1.0)))))
    if target <= n:
        return rows_wanted
    seed = int.from_bytes(hmac.new(key, f"fedembed-decoys|{table}".encode(), hashlib.sha256).digest()[:16], "little")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(rows)
    out = np.zeros(rows, dtype=bool)
    out[rows_wanted] = True
    room = target - n
    candidates = order[~out[order]][:room]
    out[candidates] = True
    return np.flatnonzero(out).astype(np.int64)


# --------------------------------------------------------------------------- per-row freshness


@dataclass
class RowState:
    """Per-row freshness of an organisation's table cache (kept next to it, never sent).

    Attributes
    ----------
    version : int
        The cache version this state describes.
    seen : dict[str, np.ndarray]
        int32 per row: the version at which the cached value was last known current
        (-1: unknown).
    stamps : dict[str, np.ndarray]
        int32 per row: the coordinator's stamp (round of last change) of the cached value.
    request : dict[str, RowRequest] or None
        The working set asked for in the last reply, at ``version`` (None: none asked).
    extra : dict[str, np.ndarray]
        Rows found looked up outside the working set; added to it from then on.
    uploaded : dict[str, np.ndarray]
        The rows of its last plain update, sent in round ``uploaded_round`` (0: none).
    """

    version: int
    seen: dict[str, np.ndarray]
    stamps: dict[str, np.ndarray]
    request: dict[str, RowRequest] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    uploaded: dict[str, np.ndarray] = field(default_factory=dict)
    uploaded_round: int = 0

    @staticmethod
    def fresh_start(shapes: Mapping[str, tuple[int, int]], version: int) -> RowState:
        """Nothing known of the rows, except that version 0 tables are the seeded ones."""
        known = 0 if version == 0 else -1
        return RowState(
            version,
            {n: np.full(s[0], known, dtype=np.int32) for n, s in shapes.items()},
            {n: np.zeros(s[0], dtype=np.int32) for n, s in shapes.items()},
        )

    @staticmethod
    def load(state_dir: Path, shapes: Mapping[str, tuple[int, int]], version: int, key: str) -> RowState:
        """The row state saved with a cache at ``version`` of run ``key``; a fresh start if none fits."""
        meta_p, data_p = Path(state_dir) / "rows.json", Path(state_dir) / "rows.npz"
        try:
            meta = json.loads(meta_p.read_text())
            if not isinstance(meta, dict) or meta.get("key") != key or meta.get("version") != version:
                raise ValueError("it describes another cache")
            if meta.get("sha256") != file_sha256(data_p):
                raise ValueError("rows.npz does not match its checksum")
            with np.load(data_p, allow_pickle=False) as z:
                seen = {n: z[f"seen.{n}"] for n in shapes}
                stamps = {n: z[f"stamps.{n}"] for n in shapes}
                extra = {n: z[f"extra.{n}"] for n in shapes if f"extra.{n}" in z.files}
                uploaded = {n: z[f"up.{n}"] for n in shapes if f"up.{n}" in z.files}
                request = None
                if meta.get("request"):
                    request = {n: RowRequest(z[f"req.{n}.ids"], z[f"req.{n}.new"]) for n in shapes}
            if any(seen[n].shape != (s[0],) or stamps[n].shape != (s[0],) for n, s in shapes.items()):
                raise ValueError("rows.npz describes tables of other shapes")
            return RowState(version, seen, stamps, request, extra, uploaded, int(meta.get("uploaded_round", 0)))
        except FileNotFoundError:
            pass
        except Exception as exc:  # any damage: start again knowing nothing, never half use it
            log.info("row state in %s not used (%s); rows are fetched again as needed", state_dir, exc)
        return RowState.fresh_start(shapes, version)

    def save(self, state_dir: Path, key: str) -> None:
        """Write the state atomically (the metadata last, naming the data's checksum)."""
        arrays: dict[str, np.ndarray] = {}
        for n in self.seen:
            arrays[f"seen.{n}"], arrays[f"stamps.{n}"] = self.seen[n], self.stamps[n]
            if n in self.extra:
                arrays[f"extra.{n}"] = self.extra[n]
            if n in self.uploaded:
                arrays[f"up.{n}"] = self.uploaded[n]
            if self.request is not None:
                arrays[f"req.{n}.ids"], arrays[f"req.{n}.new"] = self.request[n].ids, self.request[n].new
        digest = atomic_write_npz(Path(state_dir) / "rows.npz", arrays)
        meta = {"version": self.version, "key": key, "sha256": digest, "request": self.request is not None,
                "uploaded_round": self.uploaded_round}
        atomic_write(Path(state_dir) / "rows.json", json.dumps(meta).encode())

    def rebuilt(self) -> None:
        """The cache was rebuilt from the seeded version 0: every row is that version's value."""
        for n in self.seen:
            self.seen[n][:] = 0
            self.stamps[n][:] = 0
        self.request = None
        self.uploaded, self.uploaded_round = {}, 0

    def apply(self, sync: Mapping[str, RowSync], scope: str, since: int, version: int, secure: bool = False) -> None:
        """Check a sync against what this organisation holds, then mark the rows it makes current.

        Parameters
        ----------
        sync : Mapping[str, RowSync]
            The decoded sync (every table's rows sorted and in range).
        scope : str
            ``all`` (every row changed after ``since``) or ``requested`` (the rows of the
            working set last asked for that changed after ``since``, and its new rows).
        since : int
            The version the coordinator says the cache held.
        version : int
            The version the sync brings the cache to (the round's tables).
        secure : bool
            A secure round (its own plain upload is not checked for: a secure sum may
            leave out a vector that arrived late).

        Raises
        ------
        SyncRefused
            An unknown scope, a ``requested`` sync with rows outside the request, a stamp
            above ``version`` or below 1, a row rolled back to an older stamp than the one
            held, an unchanged row resent, a ``requested`` sync with no request on record,
            or (plain rounds) a sync showing that the round of its last upload was applied
            (a row stamped with that round) that lacks a row of that upload.
        """
        if scope not in ("all", "requested"):
            raise SyncRefused(f"a sync of scope {scope!r} (all or requested)")
        if scope == "requested" and self.request is None:
            raise SyncRefused("a sync of the requested rows, but this organisation has no request on record")
        for name, rs in sync.items():
            if name not in self.seen:
                raise SyncRefused(f"a sync of unknown table {name!r}")
            if rs.ids.size == 0:
                continue
            if rs.stamps is None:
                if scope == "requested":
                    raise SyncRefused(f"table {name!r}: synced rows without their version stamps")
                continue
            st = rs.stamps
            if st.min() < 1 or st.max() > version:
                raise SyncRefused(f"table {name!r}: row stamps outside [1, {version}] (version 0 never travels)")
            held = self.stamps[name][rs.ids]
            if np.any(st < held):
                bad = rs.ids[st < held][:5].tolist()
                raise SyncRefused(f"table {name!r}: rows {bad} rolled back to an older version than the one held")
            if scope == "requested":
                req = self.request[name]  # type: ignore[index]
                inside = np.isin(rs.ids, req.ids, assume_unique=True)
                if not inside.all():
                    raise SyncRefused(
                        f"table {name!r}: {int((~inside).sum())} rows outside the working set this organisation asked "
                        f"for (e.g. {rs.ids[~inside][:5].tolist()})"
                    )
                if since > 0:
                    unchanged = (st <= since) & ~np.isin(rs.ids, req.new, assume_unique=True)
                    if unchanged.any():
                        raise SyncRefused(f"table {name!r}: rows {rs.ids[unchanged][:5].tolist()} resent though unchanged "
                                          f"since version {since}, where this organisation holds them")
        self._check_own_upload(sync, since, secure, scope)
        for name, seen in self.seen.items():
            rs = sync.get(name)
            if scope == "all":
                if since == 0:
                    seen[:] = version
                else:
                    seen[seen == since] = version
            else:
                seen[self.request[name].ids] = version  # type: ignore[index]
            if rs is not None and rs.ids.size:
                seen[rs.ids] = version
                if rs.stamps is not None:
                    self.stamps[name][rs.ids] = rs.stamps
        self.version = version

    def _check_own_upload(self, sync: Mapping[str, RowSync], since: int, secure: bool, scope: str) -> None:
        """Rows it changed itself must come back once the round they were sent in was applied.

        When the coordinator accepted its last plain update (it now assumes the cache
        version of that round: ``since == uploaded_round - 1``) and the sync shows that round
        was applied (some row stamped ``uploaded_round``), every row of that update changed
        then and must be in the sync (those it asked for, under a ``requested`` sync): an
        omission is caught.
        """
        r = self.uploaded_round
        if secure or r == 0 or since != r - 1 or not self.uploaded:
            return
        applied = any(rs.stamps is not None and bool(np.any(rs.stamps == r)) for rs in sync.values())
        if not applied:
            return
        for name, ids in self.uploaded.items():
            if scope == "requested":
                ids = ids[np.isin(ids, self.request[name].ids, assume_unique=True)]  # type: ignore[index]
            rs = sync.get(name)
            got = rs.ids if rs is not None else np.zeros(0, np.int64)
            missing = ids[~np.isin(ids, got, assume_unique=True)]
            if missing.size:
                raise SyncRefused(
                    f"table {name!r}: rows {missing[:5].tolist()} it updated itself in round {r} are missing from the "
                    f"sync although round {r} was applied: the coordinator omitted changed rows"
                )

    def stale(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Those of ``rows`` not known current at this state's version (empty tables left out)."""
        out = {}
        for name, ids in rows.items():
            bad = ids[self.seen[name][ids] != self.version]
            if bad.size:
                out[name] = bad
        return out

    def fresh_mask(self, name: str) -> np.ndarray:
        """Boolean per row of ``name``: known current at this state's version."""
        return self.seen[name] == self.version

    def add_extra(self, rows: Mapping[str, np.ndarray]) -> None:
        """Rows found looked up outside the working set: they join it for good."""
        for name, ids in rows.items():
            self.extra[name] = np.union1d(self.extra.get(name, np.zeros(0, np.int64)), ids).astype(np.int64)

    def with_extra(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``rows`` with the rows found looked up outside them added."""
        return {n: np.union1d(ids, self.extra[n]).astype(np.int64) if n in self.extra else ids for n, ids in rows.items()}

    def make_request(self, rows: Mapping[str, np.ndarray]) -> dict[str, RowRequest]:
        """Ask for ``rows`` (sorted, unique, per table); the ones not current now are marked new. Kept as the request on record."""
        request = {}
        for name in self.seen:
            ids = np.asarray(rows.get(name, np.zeros(0, np.int64)), dtype=np.int64)
            new = ids[self.seen[name][ids] != self.version]
            request[name] = RowRequest(ids, new)
        self.request = request
        return request


@contextlib.contextmanager
def lookup_guard(model: SplitModel, state: RowState) -> Iterator[None]:
    """Within the block, looking up a row of a shared table that is not fresh raises :class:`StaleRowError`.

    A forward pre-hook on every shared table module checks the ids it is asked for against
    the row state (one boolean gather per lookup).
    """
    masks = {n: torch.from_numpy(state.fresh_mask(n)) for n in model.table_names}
    on_device: dict[tuple[str, str], torch.Tensor] = {}

    def checker(name: str):
        def hook(_module, args, kwargs):
            ids = args[0] if args else kwargs.get("input")
            if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
                return
            key = (name, str(ids.device))
            if key not in on_device:
                on_device[key] = masks[name].to(ids.device)
            flat = ids.reshape(-1)
            ok = on_device[key][flat]
            if not bool(ok.all()):
                raise StaleRowError({name: np.unique(flat[~ok].cpu().numpy()).astype(np.int64)})
        return hook

    handles = [model.table(n).register_forward_pre_hook(checker(n), with_kwargs=True) for n in model.table_names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def requested_rows(task: Task, shapes: Mapping[str, tuple[int, int]], mode: str, pad: float, state: RowState,
                   state_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What an organisation uses and what it asks for under ``mode`` (``working-set`` or ``padded``).

    Returns
    -------
    used : dict[str, np.ndarray]
        Its working set (with rows found looked up outside it): must be fresh before use.
    asked : dict[str, np.ndarray]
        What its reply asks for: ``used``, padded in ``padded`` mode (:func:`padded`).
    """
    used = state.with_extra(working_set(task, shapes))
    if mode != PADDED:
        return used, used
    key = decoy_key(state_dir)
    return used, {n: padded(ids, shapes[n][0], pad, key, n) for n, ids in used.items()}


def sync_rows_sent(sync: Mapping[str, RowSync]) -> int:
    """Rows a sync carries (all tables)."""
    return sum(int(rs.ids.size) for rs in sync.values())
