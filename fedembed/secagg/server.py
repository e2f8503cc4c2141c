"""The coordinator's secure round: SecAgg+ stages as Message API round trips.

Round trips (message types ``train`` then ``train.<stage>``):

- ``dense`` / ``revealed``: train (+ signed key advertisement, + row ids when revealed)
  -> share -> masked -> check -> unmask: **5 round trips** (a plain round takes 1).
- ``union``: train -> share -> indicators -> check_indicators -> unmask_indicators ->
  masked -> check -> unmask: **8 round trips**; the first secure sum (per-row counters)
  yields the row set U, the second sums the values over U only.

The ``check`` stages are the consistency check against an active coordinator: every
organisation signs the lists it was given (parties, sharers, deliverers, row set) and
reveals shares only for a statement signed by a majority of the roster, so the
coordinator cannot tell different organisations different stories about who dropped.
They cost one round trip per phase and, per organisation, one signature up (~100
bytes) and the others' signatures down.

Local training and the key advertisement share a round trip; the share exchange cannot
share one with the masked upload, because an organisation must know who shared before it
masks (else a neighbour that vanished before sharing leaves a mask nobody can remove).

Every reply is identified by its roster signature (:func:`fedembed.identity.verify_reply`),
never by what it says. Any fault of one organisation (a malformed, oversized, unsigned or
missing reply, a forged or copied key, an unsigned share) is logged and recorded under
its name, and the round goes on without it as a dropout. A share that does not open is
a complaint of its receiver against its sender: the sender is named, the receiver stays.
If the secure sum cannot be finished (:class:`fedembed.secagg.protocol.RoundAbandoned`),
or decodes outside what honest organisations can send, the round is abandoned: tables
unchanged, logged, and the next round runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedembed.config import StageHeader
from fedembed.secagg.graph import default_neighbours, default_threshold
from fedembed.secagg.primitives import CryptoError
from fedembed.secagg.protocol import (
    CHECK_STAGE,
    MASK_STAGE,
    UNMASK_STAGE,
    ProtocolError,
    RoundAbandoned,
    RowsMissing,
    ServerSession,
    phases_for,
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

    def train_message(self, node: int, round_: int) -> RecordDict:
        """The ``train`` message of ``round_`` for ``node``."""
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

_FAULTS = (UpdateError, ProtocolError, CryptoError, KeyError, TypeError, ValueError)
ROWS_MISSING = RowsMissing.__name__
"""Error code of an organisation whose touched rows were left out of U (a cancelled indicator)."""


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
    """

    def __init__(self, coord: SecureRoundHost, round_: int, entry: dict) -> None:
        self.coord = coord
        self.cfg = coord.cfg
        self.round = round_
        self.entry = entry
        self.shapes = dict(coord.shapes)
        self.context = session_context(self.cfg.run_key(), round_)
        self.phases = phases_for(self.cfg.row_set)
        self.session: ServerSession | None = None
        self.names: dict[int, str] = {}  # node -> verified roster name

    # ------------------------------------------------------------------ plumbing
    def _config(self) -> ConfigRecord:
        return ConfigRecord(StageHeader(round=self.round, run_key=self.cfg.run_key(), drop=json.dumps(self.cfg.drop)).to_config())

    def _message(self, secagg: dict, **records: object) -> RecordDict:
        return RecordDict({"config": self._config(), "secagg": ConfigRecord(secagg), **records})

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
                self._fault(rep.node, f"{stage}: no reply: {rep.error}")
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
                if error.startswith(ROWS_MISSING):
                    raise RoundAbandoned(f"{self._name(rep.node)} reports that rows it touched are missing from U: {error}")
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

    # ------------------------------------------------------------------ stages
    def run(self, nodes: list[int]) -> AggregateSum | None:
        """Run the round's stages; returns the per-row sums, or None if the round was abandoned."""
        try:
            return self._run(nodes)
        except RoundAbandoned as exc:
            self.entry["abandoned"] = str(exc)
            log.warning("round %d abandoned, tables unchanged: %s", self.round, exc)
            return None

    def _train(self, nodes: list[int]) -> tuple[dict[int, dict[str, object]], dict[int, RowSet]]:
        coord, entry = self.coord, self.entry
        t0 = time.perf_counter()
        contents = {n: coord.train_message(n, self.round) for n in nodes}
        down = sum(record_bytes(c) for c in contents.values())
        up_before = entry["upload_bytes"]
        replies = coord.transport.exchange("train", contents, self.cfg.round_timeout)
        adverts, rows = {}, {}
        for rep in replies:
            name, update = coord.read_train_reply(rep, entry, self.round, secure=True)
            if name is None or update is None:
                continue
            self.names[rep.node] = name
            try:
                sec = rep.content["secagg"]
                adverts[rep.node] = {k: sec[k] for k in sec.keys()}
                if self.cfg.row_set == "revealed":
                    rs = {k: v.astype(np.int64) for k, v in decode_arrays(rep.content["rows"]).items()}
                    check_rowset(rs, self.shapes)
                    rows[rep.node] = rs
            except _FAULTS as exc:
                adverts.pop(rep.node, None)
                self._fault(rep.node, f"train: bad key advertisement: {exc}")
        self.entry["download_bytes"] += down
        self.entry["stages"]["train"] = {
            "seconds": time.perf_counter() - t0,
            "upload_bytes": entry["upload_bytes"] - up_before,
            "download_bytes": down,
        }
        return adverts, rows

    def _run(self, nodes: list[int]) -> AggregateSum | None:
        cfg = self.cfg
        adverts, revealed = self._train(nodes)
        minimum = max(2, cfg.min_orgs)
        if len(adverts) < minimum:
            raise RoundAbandoned(f"{len(adverts)} organisations advertised keys, {minimum} needed")
        n0 = len(adverts)
        k = cfg.neighbours or default_neighbours(n0)
        t = cfg.threshold or default_threshold(min(k, n0 - 1))
        s = ServerSession(self.context, self.phases, adverts, self.names, self.coord.roster, k, t,
                          seed=cfg.seed * 1_000_003 + self.round)
        self.session = s
        for node, reason in s.faults.items():
            self._fault(node, f"train: {reason}")
        n = len(s.parties)
        if n < minimum:
            raise RoundAbandoned(f"{n} organisations with usable keys, {minimum} needed")
        self.entry["secure"] = {"row_set": cfg.row_set, "parties": n, "neighbours": min(k, n - 1), "threshold": s.threshold}

        # share
        contents = {}
        for p in s.parties:
            sec: dict = {"u1": s.parties, "threshold": s.threshold}
            for q, adv in s.share_request(p).items():
                sec.update({f"adv.{q}.{f}": (v.decode() if f == "name" else v) for f, v in adv.items()})
            contents[s.node_of[p]] = self._message(sec)
        shares: dict[int, dict[int, tuple[bytes, bytes]]] = {}

        def take_shares(node: int, c: RecordDict) -> None:
            cts, sigs = c["shares"], c["share_sigs"]
            shares[s.party_of[node]] = {int(q): (bytes(cts[q]), bytes(sigs[q])) for q in cts.keys()}

        self._exchange("share", contents, take_shares)
        known = set(s.faults)
        s.route_shares(shares)
        for node, reason in s.faults.items():
            if node not in known:
                self._fault(node, f"share: {reason}")

        total, rowset, counts = None, None, None
        active = sorted(s.u2)
        for phase in self.phases:
            stage = MASK_STAGE[phase]
            if phase == "indicators":
                length, dtype = indicator_length(self.shapes), indicator_dtype(n)
            else:
                if cfg.row_set == "dense":
                    rowset = dense_rowset(self.shapes)
                elif cfg.row_set == "revealed":
                    rowset = union_of([revealed[s.node_of[p]] for p in active if s.node_of[p] in revealed], self.shapes)
                length, dtype = values_length(rowset, self.shapes), np.uint32
            contents = {}
            for p in active:
                u2, cts = s.masked_request(p)
                records: dict = {}
                if phase == self.phases[0]:
                    records["shares"] = ConfigRecord({str(q): ct for q, (ct, _) in cts.items()})
                    records["share_sigs"] = ConfigRecord({str(q): sig for q, (_, sig) in cts.items()})
                if phase == "values" and cfg.row_set != "dense":
                    records["rowset"] = encode_arrays({name: ids.astype(np.int32) for name, ids in rowset.items()})
                contents[s.node_of[p]] = self._message({"u2": u2}, **records)

            def take_masked(node: int, c: RecordDict, phase: str = phase, length: int = length, dtype: type = dtype) -> None:
                party = s.party_of[node]
                complaints = self._complaints(party, c["complaints"]) if "complaints" in c else {}
                s.add_masked(phase, party, array_view(c["masked"]["vector"]), length, dtype)
                for sender, reason in complaints.items():  # recorded once the reply is accepted whole
                    self.entry.setdefault("accused", {})[sender] = reason
                    log.warning("round %d: %s is accused: %s", self.round, sender, reason)

            self._exchange(stage, contents, take_masked)
            del contents
            delivered = sorted(s.delivered[phase])
            if len(delivered) < minimum:
                raise RoundAbandoned(f"phase {phase}: {len(delivered)} vectors delivered, {minimum} needed")
            # consistency check: every deliverer signs the same statement
            u3 = s.check_request(phase, rowset_digest(rowset) if phase == "values" else b"")
            contents = {s.node_of[p]: self._message({"u3": u3}) for p in delivered}
            self._exchange(CHECK_STAGE[phase], contents,
                           lambda node, c, phase=phase: s.add_check(phase, s.party_of[node], bytes(c["check"]["signature"])))
            signers = sorted(s.signatures[phase])
            sigs = {f"sig.{p}": sig for p, sig in s.signatures[phase].items()}
            contents = {s.node_of[p]: self._message(sigs) for p in signers}
            responses: dict[int, dict[str, bytes]] = {}

            def take_unmask(node: int, c: RecordDict) -> None:
                responses[s.party_of[node]] = {k: bytes(v) for k, v in c["unmask"].items()}

            self._exchange(UNMASK_STAGE[phase], contents, take_unmask)
            t_finish = time.perf_counter()
            total = s.finish(phase, responses, length, dtype, minimum)
            self.entry["stages"][UNMASK_STAGE[phase]]["seconds"] += time.perf_counter() - t_finish  # mask removal
            if phase == "indicators":
                try:
                    rowset, counts = rowset_from_counts(total, self.shapes, len(delivered))
                except UpdateError as exc:
                    raise RoundAbandoned(f"the secure indicator sum is impossible: {exc}") from exc
                self.entry["secure"]["union_rows"] = int(sum(ids.size for ids in rowset.values()))
                active = sorted(responses)  # rows in U and the indicator phase finished: they may send values
        self.entry["secure"]["rows"] = int(sum(ids.size for ids in rowset.values()))
        delivered_values = len(s.delivered["values"])
        self.entry["clients"] = delivered_values
        scales = ValueScales(n=n, clip_delta=cfg.delta_clip, max_weight=cfg.train.max_row_weight)
        self.entry["secure"]["error_bound"] = scales.bound()
        try:
            return decode_values(total, rowset, self.shapes, scales, delivered_values, counts)
        except UpdateError as exc:
            raise RoundAbandoned(f"the secure sum is outside what honest organisations can send: {exc}") from exc

    def _complaints(self, receiver: int, record: ConfigRecord) -> dict[str, str]:
        """A receiver's complaints against share senders (sender name -> reason); nobody is removed.

        Raises
        ------
        ProtocolError
            A complaint against a party that is not the receiver's neighbour.
        """
        s = self.session
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
    """Run one secure round (see :class:`SecureRound`); None when abandoned."""
    return SecureRound(coord, round_, entry).run(nodes)
