"""An organisation's working set: which table rows it keeps fresh, what asking for them reveals, and proof it never uses a stale one.

The coordinator's tables change every round, mostly in rows an organisation never looks
up. With its own :class:`SyncPolicy` an organisation asks, in its signed ``train`` reply
(record ``want``), for a set of rows that holds every row its data can look up (its
*working set*, from :meth:`fedembed.task.Task.working_set` or, for a task without that
hook, from one pass over its data with the tables' lookups recorded); the next round's
sync carries only those of them that changed since its cache version, plus rows new to
the set (:meth:`fedembed.tables.VersionedTables.rows_requested`). The policy is the
organisation's own (node config ``sync``, ``fedembed client --sync``), never the
coordinator's:

=========== ====================================================================== =========================
mode        what the coordinator learns from the request                           default for
=========== ====================================================================== =========================
full        nothing (every changed row is sent, as before)                         secure ``union``/``dense``
padded      the rows its own uploads of the run showed (plain update ids, secure   plain, secure ``revealed``
            ``revealed`` row ids; none in ``union``/``dense``), in the clear, and
            a grow-only *cover*: every other row it uses, each layer of them
            hidden among ``pad - 1`` times as many decoys drawn from a secret
            permutation of the table (:class:`RequestCover`)
working-set its whole working set in the clear, the rows only its held-out data    opt-in
            looks up included
=========== ====================================================================== =========================

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
from typing import Any, ClassVar

import numpy as np
import torch

from fedembed.errors import FedembedError
from fedembed.model import SplitModel
from fedembed.store import atomic_write, atomic_write_npz, file_sha256
from fedembed.tables import RowRequest, RowSync
from fedembed.task import SPLITS, Task, task_loss

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
        coordinator learns nothing of an organisation's rows; ``padded`` in plain and
        secure ``revealed`` rounds, whose uploads show the rows they train anyway, so the
        request adds only a cover over the rows its uploads never show), ``full``,
        ``working-set`` or ``padded`` (see the module docstring).
    pad : float
        ``padded`` only: each layer of the cover holds ``ceil(pad x n)`` rows for the
        ``n`` rows it hides (at most what is left of the table), so a row of the layer is
        one of its own with probability ``n / ceil(pad x n) <= 1 / pad`` to a coordinator
        with no other knowledge of which rows it uses.
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
        return FULL if secure and row_set in ("union", "dense") else PADDED

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


def used_rows(task: Task, shapes: Mapping[str, tuple[int, int]], state: RowState) -> dict[str, np.ndarray]:
    """The rows an organisation will look up: its working set with the rows found looked up outside it (must be fresh)."""
    return state.with_extra(working_set(task, shapes))


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
                task_loss(task, model, batch)
                for name, (ids, _offsets) in task.id_bags(batch).items():
                    if name in seen:
                        seen[name].append(ids.reshape(-1).cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return {n: np.unique(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64) for n, v in seen.items()}


def decoy_key(state_dir: Path) -> bytes:
    """This organisation's secret for choosing decoy rows (made once, kept in its state dir, never sent).

    A new secret draws new decoys: a coordinator that compares requests from before and
    after can then tell the rows the organisation really uses (those in both). So a damaged
    secret is replaced loudly, never silently.
    """
    path = Path(state_dir) / "sync-decoys.key"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        log.warning("%s holds %d bytes, not a 32-byte secret; a new one is made: the decoys of its sync requests "
                    "change, and a coordinator comparing its requests from before and after can tell the rows it "
                    "uses", path, len(key))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s cannot be read (%s); a new decoy secret is made: the decoys of its sync requests change",
                    path, exc)
    key = secrets.token_bytes(32)
    atomic_write(path, key)
    return key


def decoy_order(key: bytes, table: str, rows: int) -> np.ndarray:
    """This organisation's secret permutation of the rows of ``table``: where its decoys come from, in order.

    It depends only on the organisation's secret and the table (not on the run, its data or
    its requests), so a cover rebuilt from nothing draws the same decoys again.
    """
    seed = int.from_bytes(hmac.new(key, f"fedembed-decoys|{table}".encode(), hashlib.sha256).digest()[:16], "little")
    return np.random.Generator(np.random.PCG64(seed)).permutation(rows).astype(np.int64)


def cover_layer(hide: np.ndarray, taken: np.ndarray, order: np.ndarray, drawn: int, pad: float) -> tuple[np.ndarray, int]:
    """The decoys that hide the rows ``hide``: the next rows of ``order`` not ``taken`` and not in ``hide``.

    Parameters
    ----------
    hide : np.ndarray
        Sorted rows to hide (n of them), none of them ``taken``.
    taken : np.ndarray
        Boolean per row: already in the request (shown or covered).
    order : np.ndarray
        The organisation's secret permutation of the table (:func:`decoy_order`).
    drawn : int
        How many rows of ``order`` earlier layers went through.
    pad : float
        The layer holds ``ceil(pad x n)`` rows, or every row not yet taken if fewer.

    Returns
    -------
    decoys : np.ndarray
        Sorted decoy rows: a uniformly random choice, to whoever does not know ``order``,
        among the rows neither taken nor hidden.
    drawn : int
        Where the next layer starts in ``order``.
    """
    n = int(hide.size)
    want = int(np.ceil(pad * n - 1e-9)) - n
    if n == 0 or want <= 0:
        return np.zeros(0, np.int64), drawn
    rest = order[drawn:]
    free = ~taken[rest]
    free[np.isin(rest, hide, assume_unique=True)] = False
    pick = np.flatnonzero(free)[:want]
    if pick.size == 0:
        return np.zeros(0, np.int64), len(order)
    return np.sort(rest[pick]), drawn + int(pick[-1]) + 1


@dataclass
class RequestCover:
    """What a ``padded`` request holds (kept in the organisation's state dir, per run; never sent as such).

    The request is ``shown`` in the clear plus ``cover``. Both only grow: a row never
    leaves the request, so the coordinator learns nothing from the rows an organisation
    stops using, and the same rows are asked for every round (the request travels as its
    digest). When the organisation comes to use rows that are in neither (its first
    request, held-out data that changed, a lookup outside its working set), they enter the
    cover as one *layer* together with ``ceil(pad x n) - n`` decoys: the next rows of its
    secret permutation of the table (:func:`cover_layer`).

    Attributes
    ----------
    shown : dict[str, np.ndarray]
        Sorted rows its own uploads of this run showed the coordinator (the row ids of its
        plain updates and of its secure ``revealed`` row sets; none in ``union``/``dense``).
    cover : dict[str, np.ndarray]
        Sorted rows: every other row it ever used, and the decoys of their layers.
    drawn : dict[str, int]
        Per table, how many rows of its secret permutation the layers went through.
    layers : int
        Layers added so far (all tables).
    """

    shown: dict[str, np.ndarray]
    cover: dict[str, np.ndarray]
    drawn: dict[str, int]
    layers: int = 0

    FILE: ClassVar[str] = "sync-cover"

    @staticmethod
    def empty(shapes: Mapping[str, tuple[int, int]]) -> RequestCover:
        """Nothing shown, nothing covered."""
        return RequestCover({n: np.zeros(0, np.int64) for n in shapes}, {n: np.zeros(0, np.int64) for n in shapes},
                            {n: 0 for n in shapes})

    @staticmethod
    def load(state_dir: Path, shapes: Mapping[str, tuple[int, int]], key: str) -> RequestCover:
        """The cover kept for run ``key``; empty if there is none or it is damaged.

        An empty cover costs little privacy: the next layers draw the same decoys again
        (the permutation depends on the organisation's secret only), so a request rebuilt
        from nothing mostly repeats the old one.
        """
        meta_p, data_p = Path(state_dir) / f"{RequestCover.FILE}.json", Path(state_dir) / f"{RequestCover.FILE}.npz"
        try:
            meta = json.loads(meta_p.read_text())
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not an object")
            if meta.get("key") != key:  # a new run: its coordinator has seen none of this organisation's uploads
                log.info("sync cover in %s is another run's; this run's starts empty", state_dir)
                return RequestCover.empty(shapes)
            if meta.get("sha256") != file_sha256(data_p):
                raise ValueError(f"{data_p.name} does not match its checksum")
            drawn = meta.get("drawn")
            if not isinstance(drawn, dict) or set(drawn) != set(shapes):
                raise ValueError("it describes other tables")
            with np.load(data_p, allow_pickle=False) as z:
                shown = {n: _as_rows(z[f"shown.{n}"], s[0], f"shown rows of {n!r}") for n, s in shapes.items()}
                cover = {n: _as_rows(z[f"cover.{n}"], s[0], f"cover of {n!r}") for n, s in shapes.items()}
            if not all(isinstance(drawn[n], int) and 0 <= drawn[n] <= s[0] for n, s in shapes.items()):
                raise ValueError("a decoy position outside its table")
            return RequestCover(shown, cover, {n: int(drawn[n]) for n in shapes}, int(meta.get("layers", 0)))
        except FileNotFoundError:
            pass
        except Exception as exc:  # damaged: start again, never half use it
            log.warning("sync cover in %s not used (%s); it is drawn again from the same secret permutation, so most "
                        "of its decoys come back", state_dir, exc)
        return RequestCover.empty(shapes)

    def save(self, state_dir: Path, key: str) -> None:
        """Write the cover atomically (the metadata last, naming the data's checksum)."""
        arrays = {f"shown.{n}": a for n, a in self.shown.items()} | {f"cover.{n}": a for n, a in self.cover.items()}
        digest = atomic_write_npz(Path(state_dir) / f"{self.FILE}.npz", arrays)
        meta = {"key": key, "sha256": digest, "drawn": self.drawn, "layers": self.layers}
        atomic_write(Path(state_dir) / f"{self.FILE}.json", json.dumps(meta).encode())

    def show(self, rows: Mapping[str, np.ndarray]) -> None:
        """Rows an upload of this organisation showed the coordinator: asked for in the clear from now on."""
        for name, ids in rows.items():
            if name in self.shown and np.size(ids):
                self.shown[name] = np.union1d(self.shown[name], np.asarray(ids, dtype=np.int64))

    def ask(self, used: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]], pad: float,
            secret: bytes) -> dict[str, np.ndarray]:
        """The rows to ask for: ``shown`` and ``cover``, the cover first grown by a layer over used rows in neither.

        Parameters
        ----------
        used : Mapping[str, np.ndarray]
            Sorted rows it will look up, per table.
        shapes : Mapping[str, tuple[int, int]]
            ``(rows, dim)`` per table.
        pad : float
            See :class:`SyncPolicy`.
        secret : bytes
            Its decoy secret (:func:`decoy_key`).
        """
        grew = False
        for name, (rows, _dim) in shapes.items():
            ids = np.asarray(used.get(name, np.zeros(0, np.int64)), dtype=np.int64)
            taken = np.zeros(rows, dtype=bool)
            taken[self.shown[name]] = True
            taken[self.cover[name]] = True
            hide = ids[~taken[ids]]
            if hide.size == 0:
                continue
            decoys, self.drawn[name] = cover_layer(hide, taken, decoy_order(secret, name, rows), self.drawn[name], pad)
            self.cover[name] = np.union1d(self.cover[name], np.union1d(hide, decoys)).astype(np.int64)
            log.debug("sync cover of %r: a layer of %d rows (%d decoys)", name, hide.size + decoys.size, decoys.size)
            grew = True
        self.layers += int(grew)
        return {n: np.union1d(self.shown[n], self.cover[n]).astype(np.int64) for n in shapes}


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


def sync_rows_sent(sync: Mapping[str, RowSync]) -> int:
    """Rows a sync carries (all tables)."""
    return sum(int(rs.ids.size) for rs in sync.values())
