"""The coordinator's secure rounds: SecAgg+ stages as Message API round trips, rounds overlapped.

A round's secure sum is one session (:mod:`fedembed.secagg.protocol`). A session is
**started with its round** or **set up ahead**, during the previous round:

- started with its round (message types ``train`` then ``train.<stage>``):
  ``dense``/``revealed``: train (+ signed key advertisement, + row ids when revealed) ->
  share -> masked -> check -> unmask: 5 round trips; ``union``: train -> share ->
  indicators -> check_indicators -> unmask_indicators -> masked -> check -> unmask: 8,
  the first sum (per-row counters) giving the row set U, the second summing the values
  over U only.
- set up ahead: the previous round's ``train`` replies carry the next session's signed
  advertisements, and its share request rides on the previous round's last message but
  one (the shares come back in its replies). The round's ``train`` message then brings
  each party the shares routed to it and the row set U, and the reply carries the update
  already masked: **train -> check -> unmask, 3 round trips**, or train -> unmask where the
  check cannot matter, in every row-set mode.
- set up ahead and **unmasked early** (the default where the check cannot matter): the
  ``train`` reply also carries the organisation's seed shares (its session is then spent:
  no mask-key share of it is ever revealed), so the round is **one round trip**; sessions
  are then set up two rounds ahead: round r's ``train`` message carries round r+1's share
  request, and its replies round r+1's shares and round r+2's advertisements
  (:class:`Pending`). A party that shared and does not deliver makes the round be
  abandoned, and the run's later sessions recover dropouts instead.

A session set up ahead agrees U before its round: ``dense`` every row; ``revealed`` the
rows each party said in its previous ``train`` reply it will use; ``union`` the secure sum
of indicators each party masked in the previous round's session (the rows its training
data looks up), so a ``union`` session set up ahead sums, in one group, the round's values
over U and the next round's indicators.

The first round starts its own session; so does a round after one that was abandoned, or
whose organisations are not exactly the parties that set its session up (one joined, one
left, a sample of ``--fraction``), or one under record-level DP in ``union``/``revealed``
mode (its released rows are drawn each round, so U cannot be agreed before). The last
round sets nothing up.

The ``check`` stages are the consistency check against an active coordinator: every
organisation signs the lists it was given (parties, sharers, deliverers, row set) and
reveals shares only for a statement signed by a majority of the roster, so the
coordinator cannot tell different organisations different stories about who dropped.

Every reply is identified by its roster signature (:func:`fedembed.identity.verify_reply`),
never by what it says. Any fault of one organisation (a malformed, oversized, unsigned or
missing reply, a forged or copied key, an unsigned share) is logged and recorded under
its name, and the round goes on without it as a dropout. A share that does not open is
a complaint of its receiver against its sender: the sender is named, the receiver stays.
If the secure sum cannot be finished (:class:`fedembed.secagg.protocol.RoundAbandoned`),
or decodes outside what honest organisations can send, the round is abandoned: tables
unchanged, logged, and the next round starts its own session.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedembed.config import StageHeader
from fedembed.dp import DPError
from fedembed.dp.distributed import DistributedNoise
from fedembed.secagg.graph import default_neighbours, default_threshold
from fedembed.secagg.protocol import (
    ProtocolError,
    RoundAbandoned,
    ServerSession,
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
    decode_values,
    dense_rowset,
    indicator_dtype,
    indicator_length,
    rowset_from_counts,
    union_of,
    values_length,
)
from fedembed.sparse import AggregateSum, UpdateError
from fedembed.wire import array_view, decode_arrays, encode_arrays, record_bytes

if TYPE_CHECKING:
    from fedembed.config import RunConfig
    from fedembed.identity import Roster
    from fedembed.sparse import RowUpdate


class Exchange(Protocol):
    """The message exchange a secure round runs over (a Flower ``Grid`` in production)."""

    def exchange(self, message_type: str, contents: dict[int, RecordDict], timeout: float) -> list[Any]:
        """Send one message per node; the replies (``node``, ``content``, ``error``) that arrive in time."""
        ...


class SecureRoundHost(Protocol):
    """What a secure round needs from the server that hosts it: the explicit interface, nothing more.

    :class:`fedembed.coordinator.Coordinator` implements it; a Flower user's own
    ServerApp can too, to run fedembed's secure sparse aggregation in its own rounds.
    """

    cfg: RunConfig
    """The run (row-set mode, neighbours, threshold, clip, timeouts, seed)."""
    shapes: dict[str, tuple[int, int]]
    """``(rows, dim)`` of each shared table."""
    roster: Roster
    """The federation's organisations and their public keys."""
    transport: Exchange
    """How messages reach the organisations."""

    def train_message(self, node: int, round_: int, ahead: bool = False) -> RecordDict:
        """The ``train`` message of ``round_`` for ``node`` (``ahead``: it asks for the next round's advert)."""
        ...

    def read_train_reply(self, rep: Any, entry: dict, round_: int, secure: bool = False) -> tuple[str | None, RowUpdate | None]:
        """Validate a ``train`` reply; (roster name, update) or (None, None) when refused."""
        ...

    def check_signed(self, node: int, content: RecordDict, round_: int, stage: str, expected: str | None = None) -> str | None:
        """The roster signature check of a reply; a fault, or None."""
        ...

    def refuse(self, entry: dict, who: str, reason: str, verb: str = "refused") -> None:
        """Record and log a refusal."""
        ...

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A session set up ahead, during the previous round, for ``round``.

    Attributes
    ----------
    round : int
        The round it aggregates.
    session : ServerSession
        Its parties, graph and routed shares (U2 known).
    names : dict[int, str]
        Node -> roster name, as verified when its advert came.
    rowset : RowSet or None
        U for its values (``union``/``revealed``; None: ``dense``, every row).
    counts : dict or None
        ``union``: per row of U, how many organisations' indicators hold it.
    """

    round: int
    session: ServerSession
    names: dict[int, str]
    rowset: RowSet | None = None
    counts: dict[str, np.ndarray] | None = None

    def nodes(self) -> list[int]:
        """The nodes of the parties that shared (U2)."""
        return sorted(self.session.node_of[p] for p in self.session.u2)


@dataclass
class Pending:
    """A session advertised two rounds ahead (sessions that unmask early), for ``round``: adverts only.

    Its share request rides on the ``train`` message of the round before it.
    """

    round: int
    adverts: dict[int, dict[str, object]]
    names: dict[int, str]


class SecurePipeline:
    """The secure rounds of one run: each round's sum, and the next round's session set up on its messages.

    Parameters
    ----------
    coord : SecureRoundHost
        The server hosting the rounds.
    """

    def __init__(self, coord: SecureRoundHost) -> None:
        self.coord = coord
        self.prepared: Prepared | None = None
        self.pending: Pending | None = None
        self.early_unmask = True
        """Sessions unmask early (:attr:`fedembed.config.RunConfig.early_unmask`) until a dropout costs a round:
        from then on the run's sessions recover dropouts (2 round trips a round)."""

    def run_round(self, round_: int, nodes: list[int], entry: dict, ahead: bool = False) -> AggregateSum | None:
        """One round's secure sum over ``nodes``; None when abandoned.

        Parameters
        ----------
        ahead : bool
            Set up the next round's session on this round's messages (the caller knows a
            next round follows, with the same organisations).
        """
        prepared, self.prepared = self.prepared, None
        pending, self.pending = self.pending, None
        if prepared is not None and (prepared.round != round_ or prepared.nodes() != sorted(nodes)):
            log.info("round %d starts its own secure session: the session set up ahead was for round %d with nodes %s",
                     round_, prepared.round, prepared.nodes())
            prepared = None
        if prepared is not None and len(prepared.session.u2) < max(2, self.coord.cfg.min_orgs):
            prepared = None
        if self.coord.cfg.train.dp and self.coord.cfg.row_set != "dense":
            ahead = False  # DP draws its released rows each round: U cannot be agreed before the round
        if prepared is None or not ahead or (pending is not None and (
                pending.round != round_ + 1 or sorted(pending.adverts) != sorted(nodes))):
            pending = None
        secure_round = SecureRound(self.coord, round_, entry, prepared, ahead, pending)
        agg = secure_round.run(nodes)
        if secure_round.lost_early and self.early_unmask:
            self.early_unmask = False
            log.warning("round %d: a dropout cost the round (its session unmasked early); the rest of the run's "
                        "sessions recover dropouts instead: 2 round trips a round", round_)
        self.prepared = secure_round.next if agg is not None else None
        self.pending = secure_round.next_pending if self.prepared is not None else None
        return agg


class SecureRound:
    """One round of secure aggregation (the server-side workflow), driven through its host's exchange.

    Parameters
    ----------
    coord : SecureRoundHost
        The server hosting the round (config, roster, transport, reply validation).
    round_ : int
        The round.
    entry : dict
        The round's log entry (stages, bytes, rejections are recorded in it).
    prepared : Prepared, optional
        The round's session, set up ahead during the previous round; None: it starts its own.
    ahead : bool
        Set up the next round's session on this round's messages.
    pending : Pending, optional
        The next round's session, advertised during the previous round (it unmasks
        early): its share request rides on this round's ``train`` message.
    """

    def __init__(self, coord: SecureRoundHost, round_: int, entry: dict, prepared: Prepared | None = None,
                 ahead: bool = False, pending: Pending | None = None) -> None:
        self.coord = coord
        self.cfg = coord.cfg
        self.round = round_
        self.entry = entry
        # the value vectors are laid out over the uploads' width (twice the table's where it carries the pooled
        # normaliser): the coordinator's layout, the one plain uploads are checked against
        self.shapes = coord.upload_shapes
        self.context = session_context(self.cfg.run_key(), round_)
        self.prepared = prepared
        self.ahead = ahead
        self.pending = pending if ahead else None
        self.session: ServerSession | None = None
        self.names: dict[int, str] = {}  # node -> verified roster name
        self.next_adverts: dict[int, dict[str, object]] = {}  # node -> its advert of the next round's session
        self.next_rows: dict[int, RowSet] = {}  # node -> the rows it says it will use next round (revealed)
        self.next_session: ServerSession | None = None
        self.next: Prepared | None = None
        self.after_adverts: dict[int, dict[str, object]] = {}  # node -> its advert of the session after the next
        self.lost_early = False  # abandoned because a party of a session that unmasked early did not deliver
        self.next_pending: Pending | None = None
        self._responded: set[int] = set()  # parties that answered the last unmask stage

    # ------------------------------------------------------------------ plumbing
    def _header(self) -> ConfigRecord:
        return ConfigRecord(StageHeader(round=self.round, run_key=self.cfg.run_key(), drop=json.dumps(self.cfg.drop)).to_config())

    def _message(self, secagg: dict | None, **records: object) -> RecordDict:
        content: dict = {"config": self._header(), **records}
        if secagg is not None:
            content["secagg"] = ConfigRecord(secagg)
        return RecordDict(content)

    def _exchange(self, stage: str, contents: dict[int, RecordDict], handle: Callable[[int, RecordDict], None]) -> None:
        """Send a stage and hand each valid, signed reply to ``handle`` as it arrives; account bytes and seconds.

        Replies are processed one at a time and not kept, so a stage of large masked
        vectors costs the coordinator one vector and the running sum, not n vectors. A
        fault raised by ``handle`` removes that organisation from the round, by name.
        """
        t0 = time.perf_counter()
        down = sum(record_bytes(c) for c in contents.values())
        transport = self.coord.transport
        exchange = getattr(transport, "exchange_iter", None) or transport.exchange
        up = 0
        for rep in exchange(f"train.{stage}", contents, self.cfg.round_timeout):
            if rep.error is not None or rep.content is None:
                self.coord.no_reply(self.entry, self._name(rep.node), rep.error, stage, "left the secure round")
                continue
            size = record_bytes(rep.content)
            up += size
            if size > self.cfg.max_message_bytes:
                self._fault(rep.node, f"{stage}: reply of {size} bytes exceeds the limit of {self.cfg.max_message_bytes}")
                continue
            reason = self.coord.check_signed(rep.node, rep.content, self.round, f"train.{stage}", self.names.get(rep.node))
            info = rep.content["info"] if "info" in rep.content else {}
            if reason is not None:
                self._fault(rep.node, f"{stage}: {reason}")
            elif info.get("status") != "ok":
                error = str(info.get("error", "status " + repr(info.get("status"))))
                self._fault(rep.node, f"{stage}: refused: {error}")
            else:
                try:
                    handle(rep.node, rep.content)
                except Exception as exc:  # noqa: BLE001 - any malformed reply: that org leaves, the round goes on
                    self._fault(rep.node, f"{stage}: {type(exc).__name__}: {exc}")
            del rep
        self._account(stage, time.perf_counter() - t0, up, down)

    def _account(self, stage: str, seconds: float, up: int, down: int) -> None:
        self.entry["stages"][stage] = {"seconds": seconds, "upload_bytes": up, "download_bytes": down}
        self.entry["upload_bytes"] += up
        self.entry["download_bytes"] += down

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")

    def _fault(self, node: int, reason: str) -> None:
        self.coord.refuse(self.entry, self._name(node), reason, "left the secure round")

    # ------------------------------------------------------------------ the round
    def run(self, nodes: list[int]) -> AggregateSum | None:
        """Run the round's stages; returns the per-row sums, or None if the round was abandoned."""
        try:
            return self._run_ahead(nodes) if self.prepared is not None else self._run_fresh(nodes)
        except RoundAbandoned as exc:
            self.entry["abandoned"] = str(exc)
            log.warning("round %d abandoned, tables unchanged: %s", self.round, exc)
            return None

    def _minimum(self) -> int:
        return max(2, self.cfg.min_orgs)

    def _train(self, nodes: list[int], extra: Callable[[int], dict] | None = None,
               take: Callable[[int, RecordDict], None] | None = None) -> list[int]:
        """The ``train`` exchange: the plan and sync (and ``extra(node)`` records); the nodes whose replies were taken.

        Each accepted reply's next-round advert (and, ``revealed``, its rows) is kept for
        the next session; ``take(node, content)`` handles the rest, and a fault it raises
        removes that organisation from the round. Replies are handled one at a time as they
        are pulled and not kept: a round set up ahead brings the masked vectors here, and
        the coordinator holds one of them and the running sum, not n.
        """
        coord, entry = self.coord, self.entry
        t0 = time.perf_counter()
        contents = {}
        for n in nodes:
            c = coord.train_message(n, self.round, ahead=self.ahead and self.pending is None)
            if extra is not None:
                for key, rec in extra(n).items():
                    c[key] = rec
            contents[n] = c
        down = sum(record_bytes(c) for c in contents.values())
        up_before = entry["upload_bytes"]
        accepted: list[int] = []
        exchange = getattr(coord.transport, "exchange_iter", None) or coord.transport.exchange
        for rep in exchange("train", contents, self.cfg.round_timeout):
            name, update = coord.read_train_reply(rep, entry, self.round, secure=True)
            if name is None or update is None:
                continue
            expected = self.names.get(rep.node)
            if expected is not None and name != expected:  # cannot happen with one name per node per round; kept explicit
                self._fault(rep.node, f"train: signed as {name!r}, its session was set up by {expected!r}")
                continue
            self.names[rep.node] = name
            try:  # every record read before any is used: a reply is taken whole or refused whole
                kept = self._read_next(rep.content)
                if take is not None:
                    take(rep.node, rep.content)
                accepted.append(rep.node)
            except Exception as exc:  # noqa: BLE001 - any malformed reply: that org leaves, the round goes on
                self._fault(rep.node, f"train: {type(exc).__name__}: {exc}")
                continue
            self._keep_next(rep.node, *kept)
            del rep
        self.entry["download_bytes"] += down
        self.entry["stages"]["train"] = {
            "seconds": time.perf_counter() - t0,
            "upload_bytes": entry["upload_bytes"] - up_before,
            "download_bytes": down,
        }
        return accepted

    def _read_next(self, content: RecordDict) -> tuple[dict[str, object] | None, RowSet | None]:
        """A train reply's advert of the next round's session and (``revealed``) its rows, read, not yet kept.

        Raises
        ------
        Exception
            A malformed record: the reply is refused whole (the caller names the sender).
        """
        if not self.ahead or ("next" not in content and self.pending is None):
            return None, None
        advert = None
        if "next" in content:
            nxt = content["next"]
            advert = {k: nxt[k] for k in nxt.keys()}
        return advert, self._rows(content) if self.cfg.row_set == "revealed" else None

    def _keep_next(self, node: int, advert: dict[str, object] | None, rows: RowSet | None) -> None:
        """Keep what :meth:`_read_next` read of an accepted reply (the advert is checked when the session is made)."""
        if advert is not None:
            self.next_adverts[node] = advert
        if rows is not None:
            self.next_rows[node] = rows

    def _rows(self, content: RecordDict) -> RowSet:
        """The row ids a ``revealed`` reply names (validated)."""
        rs = {k: v.astype(np.int64) for k, v in decode_arrays(content["rows"]).items()}
        check_rowset(rs, self.shapes)
        return rs

    def _new_session(self, context: bytes, groups: list[list[str]], adverts: dict[int, dict], stage: str) -> ServerSession:
        n0 = len(adverts)
        k = self.cfg.neighbours or default_neighbours(n0)
        t = self.cfg.threshold or default_threshold(min(k, max(n0 - 1, 1)))
        s = ServerSession(context, groups, adverts, self.names, self.coord.roster, k, t)
        for node, reason in s.faults.items():
            self._fault(node, f"{stage}: {reason}")
        return s

    @staticmethod
    def _share_request(s: ServerSession, party: int) -> dict:
        sec: dict = {"u1": s.parties, "threshold": s.threshold, "k": s.k}
        for q, adv in s.share_request(party).items():
            sec.update({f"adv.{q}.{f}": (v.decode() if f == "name" else v) for f, v in adv.items()})
        return sec

    @staticmethod
    def _shares_of(c: RecordDict, prefix: str = "") -> dict[int, tuple[bytes, bytes]]:
        cts, sigs = c[f"{prefix}shares"], c[f"{prefix}share_sigs"]
        return {int(q): (blob(cts[q], f"share ciphertext for party {q}"), blob(sigs[q], f"share signature for party {q}"))
                for q in cts.keys()}

    def _route(self, s: ServerSession, shares: dict[int, dict[int, tuple[bytes, bytes]]], stage: str) -> None:
        known = set(s.faults)
        s.route_shares(shares)
        for node, reason in s.faults.items():
            if node not in known:
                self._fault(node, f"{stage}: {reason}")

    def _shape_of(self, phase: str, n: int, rowset: RowSet | None) -> tuple[int, type]:
        if phase == "indicators":
            return indicator_length(self.shapes), indicator_dtype(n)
        return values_length(rowset, self.shapes), np.uint32

    def _take_masked(self, s: ServerSession, group: list[str], rowset: RowSet | None) -> Callable[[int, RecordDict], None]:
        """A handler adding a reply's masked vectors of ``group`` (all of them, or none) to the running sums."""
        shapes = {p: self._shape_of(p, len(s.parties), rowset) for p in group}
        if "values" in group:  # the U every party was sent: the pairwise masks of dropped parties are bound to it
            s.bind("values", rowset_digest(rowset if rowset is not None else dense_rowset(self.shapes)))

        def take(node: int, c: RecordDict) -> None:
            party = s.party_of.get(node)
            if party is None or party not in s.u2:
                raise ProtocolError("it is not a party that shared in this session")
            record = c["masked"]
            if set(record.keys()) != set(group):
                raise ProtocolError(f"masked vectors {sorted(record.keys())}, expected {group}")
            vectors = {}
            for phase in group:
                v = array_view(record[phase])
                length, dtype = shapes[phase]
                if v.dtype != np.dtype(dtype) or v.shape != (length,):
                    raise ProtocolError(f"masked {phase} vector is {v.dtype}{v.shape}, expected {np.dtype(dtype)}({length},)")
                vectors[phase] = v
            complaints = self._complaints(s, party, c["complaints"]) if "complaints" in c else {}
            for phase in group:
                s.add_masked(phase, party, vectors[phase], *shapes[phase])
            for sender, reason in complaints.items():  # recorded once the reply is accepted whole
                self.entry.setdefault("accused", {})[sender] = reason
                log.warning("round %d: %s is accused: %s", self.round, sender, reason)

        return take

    def _finish_group(self, s: ServerSession, group: list[str], rowset: RowSet | None, last: bool) -> dict[str, np.ndarray]:
        """Unmask a group: without the consistency check where it cannot matter, else check then unmask.

        The next round's share request rides on the round's last message but one (the check,
        or the unmask when the check is skipped). Skipping needs every party that shared to
        have delivered, the whole roster in the session and a complete graph (see
        :meth:`fedembed.secagg.protocol.ClientSession.unmask_fast`, which every organisation
        checks itself); if the sum cannot be finished that way (organisations refusing to
        skip it), the organisations that did not answer run the check and unmask.
        """
        minimum = self._minimum()
        delivered = sorted(s.delivered[group[0]])
        if len(delivered) < minimum:
            raise RoundAbandoned(f"{group_stage(group, 'mask')}: {len(delivered)} vectors delivered, {minimum} needed")
        for phase in group:
            s.check_request(phase, rowset_digest(rowset) if phase == "values" else b"")
        nxt = self._next_session() if last and self.next_session is None else None
        responses: dict[str, dict[int, dict[str, bytes]]] = {p: {} for p in group}
        if self._fast_ok(s, delivered):
            self._unmask(s, group, delivered, responses, nxt, fast=True)
            try:
                return self._finish_phases(s, group, rowset, responses)
            except RoundAbandoned as exc:
                rest = [p for p in delivered if p not in responses[group[0]]]
                if not rest:
                    raise
                log.warning("round %d: %s without the consistency check (%s); %d organisations run it", self.round,
                            group_stage(group, "unmask"), exc, len(rest))
                self.entry.setdefault("secure", {})["checked_after_fast"] = True
                delivered, nxt = rest, None
        self._check(s, group, delivered, nxt)
        signers = sorted(set(s.signatures[group[0]]).intersection(*(s.signatures[p] for p in group)))
        self._unmask(s, group, signers, responses)
        return self._finish_phases(s, group, rowset, responses)

    def _fast_ok(self, s: ServerSession, delivered: list[int]) -> bool:
        """Whether the organisations will (should) unmask this group without the consistency check."""
        size = len(self.coord.roster)
        return (self.cfg.consistency_check == "auto" and len(s.parties) == size
                and all(len(v) == len(s.parties) - 1 for v in s.graph.values())
                and delivered == sorted(s.u2) and s.threshold >= size // 2 + 1)

    def _with_next(self, contents: dict[int, RecordDict], nxt: ServerSession | None) -> None:
        """Add the next round's share request to the messages of its parties (a message of its own if need be)."""
        if nxt is None:
            return
        for party in nxt.parties:
            node = nxt.node_of[party]
            contents.setdefault(node, self._message(None))
            contents[node]["next"] = ConfigRecord(self._share_request(nxt, party))

    def _read_next_reply(self, nxt: ServerSession | None, node: int, c: RecordDict) -> Callable[[dict], None]:
        """Read a reply's part of the next round's session (its shares, the advert after); keep it by calling the result.

        Read before anything of the reply is used, kept only once all of it is accepted, so
        a reply is taken whole or refused whole.
        """
        if nxt is None or node not in nxt.party_of:
            return lambda shares: None
        if "next_shares" in c:
            mine = self._shares_of(c, "next_")
            after = None
            if "next_advert" in c:  # the session after the next one (it unmasks early): its share request rides on
                adv = c["next_advert"]  # the next round's train message
                after = {k: adv[k] for k in adv.keys()}

            def keep(shares: dict) -> None:
                shares[nxt.party_of[node]] = mine
                if after is not None:
                    self.after_adverts[node] = after
            return keep
        if "next_error" in c:
            error = str(c["next_error"].get("error", ""))[:300]
            return lambda shares: log.warning("round %d: %s refused the share request of round %d's session: %s",
                                              self.round, self._name(node), self.round + 1, error)
        return lambda shares: None

    def _check(self, s: ServerSession, group: list[str], parties: list[int], nxt: ServerSession | None) -> None:
        """The consistency check of a group: every party signs the same statement (U3: every party that delivered)."""
        u3 = sorted(s.delivered[group[0]])
        contents = {s.node_of[p]: self._message({"u3": u3}) for p in parties}
        self._with_next(contents, nxt)
        next_shares: dict[int, dict[int, tuple[bytes, bytes]]] = {}

        def take_check(node: int, c: RecordDict) -> None:
            keep_next = self._read_next_reply(nxt, node, c)
            party = s.party_of.get(node)
            if party is not None and party in parties:
                sigs = c["check"]
                for phase in group:
                    s.add_check(phase, party, blob(sigs[phase], f"check signature of {phase}"))
            keep_next(next_shares)

        self._exchange(group_stage(group, "check"), contents, take_check)
        if nxt is not None:
            self._route(nxt, next_shares, "share (next round)")

    def _unmask(self, s: ServerSession, group: list[str], parties: list[int],
                responses: dict[str, dict[int, dict[str, bytes]]], nxt: ServerSession | None = None,
                fast: bool = False) -> None:
        """The unmask stage of a group to ``parties``: with the others' signatures, or (``fast``) without a check."""
        if fast:
            secagg: dict = {"u3": sorted(s.delivered[group[0]]), "fast": True}
        else:
            secagg = {f"sig.{phase}.{p}": s.signatures[phase][p] for phase in group for p in parties}
        contents = {s.node_of[p]: self._message(secagg) for p in parties}
        self._with_next(contents, nxt)
        next_shares: dict[int, dict[int, tuple[bytes, bytes]]] = {}

        def take_unmask(node: int, c: RecordDict) -> None:
            keep_next = self._read_next_reply(nxt, node, c)
            party = s.party_of.get(node)
            if party is not None and party in parties:
                got = self._unmask_shares(group, c["unmask"], seeds_only=fast)
                for phase in group:
                    responses[phase][party] = got[phase]
            keep_next(next_shares)

        self._exchange(group_stage(group, "unmask"), contents, take_unmask)
        if nxt is not None:
            self._route(nxt, next_shares, "share (next round)")
        self._responded = set(responses[group[0]])

    def _finish_phases(self, s: ServerSession, group: list[str], rowset: RowSet | None,
                       responses: dict[str, dict[int, dict[str, bytes]]], stage: str | None = None) -> dict[str, np.ndarray]:
        """Strip the masks of each phase of the group from the shares received (mask removal is the unmask stage's)."""
        t_finish = time.perf_counter()
        totals = {}
        secrets = {}
        for phase in group:  # all recovered before any sum is touched: the check may yet bring the shares missing
            length, dtype = self._shape_of(phase, len(s.parties), rowset)
            secrets[phase] = s.recover(phase, responses[phase], length, dtype, self._minimum())
        for phase in group:
            totals[phase] = s.strip(phase, secrets[phase])
        self.entry["stages"][stage or group_stage(group, "unmask")]["seconds"] += time.perf_counter() - t_finish
        return totals

    def _next_session(self) -> ServerSession | None:
        """The next round's session from the adverts this round's train replies carried (None: nothing to set up)."""
        if not self.ahead or len(self.next_adverts) < self._minimum():
            return None
        s = self._new_session(session_context(self.cfg.run_key(), self.round + 1), ahead_groups(self.cfg.row_set),
                              self.next_adverts, "train (next round's advert)")
        if len(s.parties) < self._minimum():
            return None
        self.next_session = s
        return s

    def _prepare_next(self, rowset: RowSet | None, counts: dict[str, np.ndarray] | None) -> None:
        """The next round's session, if its shares were routed, with the U it will sum over."""
        s = self.next_session
        if s is None or len(s.u2) < self._minimum():
            return
        if self.cfg.row_set == "revealed":
            nodes = [s.node_of[p] for p in s.u2]
            rowset = union_of([self.next_rows[n] for n in nodes if n in self.next_rows], self.shapes)
        names = {s.node_of[p]: self.names[s.node_of[p]] for p in s.u2}
        self.next = Prepared(self.round + 1, s, names, rowset, counts)
        after = {n: a for n, a in self.after_adverts.items() if n in names}
        if len(after) >= self._minimum():
            self.next_pending = Pending(self.round + 2, after, {n: names[n] for n in after})

    def _summary(self, s: ServerSession) -> None:
        self.entry["secure"] = {"row_set": self.cfg.row_set, "parties": len(s.parties), "neighbours": s.k,
                                "threshold": s.threshold, "set_up_ahead": self.prepared is not None}

    def _decode(self, s: ServerSession, total: np.ndarray, rowset: RowSet, counts: dict | None) -> AggregateSum:
        self.entry["secure"]["rows"] = int(sum(ids.size for ids in rowset.values()))
        delivered_values = len(s.delivered["values"])
        self.entry["clients"] = delivered_values
        cfg = self.cfg
        noise = DistributedNoise.for_recipe(cfg.train, self.shapes, cfg.delta_clip)
        try:  # with distributed noise: refused if this many parties could wrap the noisy sum
            scales = ValueScales(n=len(s.parties), clip_delta=cfg.delta_clip, max_weight=cfg.train.max_row_weight,
                                 noise=noise)
        except DPError as exc:
            raise RoundAbandoned(str(exc)) from exc
        self.entry["secure"]["error_bound"] = scales.bound()
        if noise is not None:  # the noise actually in the sum: one share per delivered vector
            self.entry["secure"]["dp"] = {
                "shares": delivered_values, "guaranteed_shares": noise.shares,
                "noise_std": noise.std_in_sum(delivered_values) / cfg.train.max_row_weight,
                "noise_multiplier": (delivered_values * noise.local_variance) ** 0.5 / noise.l2_sensitivity,
                "update_clip": noise.clip,
            }
        try:
            return decode_values(total, rowset, self.shapes, scales, delivered_values, counts)
        except UpdateError as exc:
            raise RoundAbandoned(f"the secure sum is outside what honest organisations can send: {exc}") from exc

    def _indicator_rowset(self, s: ServerSession, total: np.ndarray) -> tuple[RowSet, dict[str, np.ndarray]]:
        try:
            rowset, counts = rowset_from_counts(total, self.shapes, len(s.delivered["indicators"]))
        except UpdateError as exc:
            raise RoundAbandoned(f"the secure indicator sum is impossible: {exc}") from exc
        return rowset, counts

    # ------------------------------------------------------------------ a session started with its round
    def _run_fresh(self, nodes: list[int]) -> AggregateSum | None:
        cfg = self.cfg
        adverts: dict[int, dict[str, object]] = {}
        revealed: dict[int, RowSet] = {}

        def take_advert(node: int, c: RecordDict) -> None:
            if "secagg" not in c:
                raise UpdateError("status ok but no key advertisement in a secure training reply")
            sec = c["secagg"]
            adv = {k: sec[k] for k in sec.keys()}
            rows = self._rows(c) if cfg.row_set == "revealed" else None
            adverts[node] = adv
            if rows is not None:
                revealed[node] = rows

        self._train(nodes, take=take_advert)
        minimum = self._minimum()
        if len(adverts) < minimum:
            raise RoundAbandoned(f"{len(adverts)} organisations advertised keys, {minimum} needed")
        s = self._new_session(self.context, fresh_groups(cfg.row_set), adverts, "train")
        self.session = s
        if len(s.parties) < minimum:
            raise RoundAbandoned(f"{len(s.parties)} organisations with usable keys, {minimum} needed")
        self._summary(s)

        contents = {s.node_of[p]: self._message(self._share_request(s, p)) for p in s.parties}
        shares: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._exchange("share", contents, lambda node, c: shares.__setitem__(s.party_of[node], self._shares_of(c)))
        self._route(s, shares, "share")

        rowset: RowSet | None = dense_rowset(self.shapes) if cfg.row_set == "dense" else None
        counts = None
        active = sorted(s.u2)
        totals: dict[str, np.ndarray] = {}
        for gi, group in enumerate(s.groups):
            if "values" in group and cfg.row_set == "revealed":
                rowset = union_of([revealed[s.node_of[p]] for p in active if s.node_of[p] in revealed], self.shapes)
            contents = {}
            for p in active:
                u2, cts = s.masked_request(p)
                records: dict = {}
                if gi == 0:
                    records["shares"] = ConfigRecord({str(q): ct for q, (ct, _) in cts.items()})
                    records["share_sigs"] = ConfigRecord({str(q): sig for q, (_, sig) in cts.items()})
                if "values" in group and cfg.row_set != "dense":
                    records["rowset"] = encode_arrays({name: ids.astype(np.int32) for name, ids in rowset.items()})
                contents[s.node_of[p]] = self._message({"u2": u2}, **records)
            self._exchange(group_stage(group, "mask"), contents, self._take_masked(s, group, rowset))
            del contents
            last = gi == len(s.groups) - 1
            totals.update(self._finish_group(s, group, rowset, last))
            if "indicators" in group:
                rowset, counts = self._indicator_rowset(s, totals["indicators"])
                self.entry["secure"]["union_rows"] = int(sum(ids.size for ids in rowset.values()))
                active = sorted(self._responded)  # in U and through the indicator phase: they may send values
        agg = self._decode(s, totals["values"], rowset, counts)
        # a union session started with its round summed the rows each party's training data looks up: the next
        # round's U too; revealed: the rows the next session's parties told
        self._prepare_next(rowset if cfg.row_set == "union" else None, counts if cfg.row_set == "union" else None)
        return agg

    # ------------------------------------------------------------------ a session set up ahead
    def _run_ahead(self, nodes: list[int]) -> AggregateSum | None:
        cfg, p = self.cfg, self.prepared
        s = p.session
        self.session = s
        self.names = dict(p.names)
        self._summary(s)
        rowset = dense_rowset(self.shapes) if cfg.row_set == "dense" else p.rowset
        group = s.groups[0]
        encoded_rowset = (encode_arrays({name: ids.astype(np.int32) for name, ids in rowset.items()})
                          if cfg.row_set != "dense" else None)
        if cfg.row_set == "union":
            self.entry["secure"]["union_rows"] = int(sum(ids.size for ids in rowset.values()))

        def extra(node: int) -> dict:
            party = s.party_of[node]
            u2, cts = s.masked_request(party)
            records: dict = {
                "secagg": ConfigRecord({"u2": u2}),
                "shares": ConfigRecord({str(q): ct for q, (ct, _) in cts.items()}),
                "share_sigs": ConfigRecord({str(q): sig for q, (_, sig) in cts.items()}),
            }
            if encoded_rowset is not None:
                records["rowset"] = encoded_rowset
            return records

        nxt: ServerSession | None = None
        if self.pending is not None:  # the next round's session (it unmasks early): its share request rides on train
            self.names.update(self.pending.names)
            nxt = self._new_session(session_context(cfg.run_key(), self.round + 1), ahead_groups(cfg.row_set),
                                    self.pending.adverts, "share request (next round)")
            if len(nxt.parties) >= self._minimum():
                self.next_session = nxt
            else:
                nxt = None

        def extra_next(node: int) -> dict:
            records = extra(node)
            if nxt is not None and node in nxt.party_of:
                records["next"] = ConfigRecord(self._share_request(nxt, nxt.party_of[node]))
            return records

        take = self._take_masked(s, group, rowset)
        early: dict[str, dict[int, dict[str, bytes]]] = {ph: {} for ph in group}
        next_shares: dict[int, dict[int, tuple[bytes, bytes]]] = {}

        def take_train(node: int, c: RecordDict) -> None:
            if "masked" not in c:
                raise UpdateError("status ok but no masked update in the reply to a session set up ahead")
            got = self._unmask_shares(group, c["unmask"], seeds_only=True) if "unmask" in c else None
            keep_next = self._read_next_reply(nxt, node, c)
            take(node, c)  # the last step that can fail: what it adds is added for a reply accepted whole
            if got is not None:
                for phase in group:
                    early[phase][s.party_of[node]] = got[phase]
            keep_next(next_shares)

        self._train(nodes, extra=extra_next, take=take_train)
        if nxt is not None:
            self._route(nxt, next_shares, "share (next round)")
        if early[group[0]]:
            totals = self._finish_early(s, group, rowset, early)
        else:
            totals = self._finish_group(s, group, rowset, last=True)
        agg = self._decode(s, totals["values"], rowset, p.counts)
        next_rowset, next_counts = None, None
        if "indicators" in group:
            next_rowset, next_counts = self._indicator_rowset(s, totals["indicators"])
        self._prepare_next(next_rowset, next_counts)
        return agg

    @staticmethod
    def _unmask_shares(group: list[str], record: ConfigRecord, seeds_only: bool) -> dict[str, dict[str, bytes]]:
        """An ``unmask`` record's shares by phase (``seeds_only``: sent without the consistency check).

        Raises
        ------
        ProtocolError
            A share of a phase outside the group, or, with ``seeds_only``, a mask-key share.
        """
        got: dict[str, dict[str, bytes]] = {p: {} for p in group}
        for key, value in record.items():
            phase, _, rest = key.partition(".")
            if phase not in got:
                raise ProtocolError(f"unmask share {key!r} of a phase outside this stage")
            if seeds_only and not rest.startswith("seed."):
                raise ProtocolError(f"a mask-key share {key!r} in an unmask without the consistency check")
            got[phase][rest] = blob(value, f"unmask share {key!r}")
        return got

    def _finish_early(self, s: ServerSession, group: list[str], rowset: RowSet | None,
                      early: dict[str, dict[int, dict[str, bytes]]]) -> dict[str, np.ndarray]:
        """Finish a group from the seed shares that came with the masked updates: no further round trip.

        Every party that shared must have delivered: the organisations revealed their seed
        shares already, so none of them will reveal a mask-key share of this session, and
        the masks of a party that did not deliver cannot be removed. Then, and if the seed
        shares do not suffice, the round is abandoned (the next starts its own session).

        Raises
        ------
        RoundAbandoned
            A party that shared did not deliver, or the sum cannot be finished.
        """
        self.entry["secure"]["early_unmask"] = True
        delivered = sorted(s.delivered[group[0]])
        if delivered != sorted(s.u2):
            missing = sorted(set(s.u2) - set(delivered))
            self.lost_early = True
            raise RoundAbandoned(
                f"{', '.join(self.coord.roster.name_of_party(q) for q in missing)} shared but did not deliver a masked "
                "update; the others sent their seed shares with theirs (early unmask), so no mask key of this session "
                "is ever revealed and its masks cannot be removed"
            )
        self._responded = set(early[group[0]])
        return self._finish_phases(s, group, rowset, early, stage="train")

    def _complaints(self, s: ServerSession, receiver: int, record: ConfigRecord) -> dict[str, str]:
        """A receiver's complaints against share senders (sender name -> reason); nobody is removed.

        Raises
        ------
        ProtocolError
            A complaint against a party that is not the receiver's neighbour.
        """
        who = self.coord.roster.name_of_party(receiver)
        out = {}
        for src, why in record.items():
            if not str(src).isdigit() or int(src) not in s.graph.get(receiver, []):
                raise ProtocolError(f"complaint against {_printable(str(src), 40)!r}, which is not its neighbour")
            sender = self.coord.roster.name_of_party(int(src))
            out[sender] = f"its share for {who} did not open ({who} reports: {_printable(str(why))})"
        return out


def _printable(text: str, limit: int = 200) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:limit]


def run_secure_round(coord: SecureRoundHost, round_: int, nodes: list[int], entry: dict) -> AggregateSum | None:
    """Run one secure round that starts its own session (see :class:`SecureRound`); None when abandoned."""
    return SecureRound(coord, round_, entry).run(nodes)
