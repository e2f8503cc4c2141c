"""The coordinator's secure round: SecAgg+ stages as Message API round trips.

Round trips (message types ``train`` then ``train.<stage>``):

- ``dense`` / ``revealed``: train (+ key advertisement, + row ids when revealed) -> share
  -> masked -> unmask: **4 round trips** (a plain round takes 1).
- ``union``: train -> share -> indicators -> unmask_indicators -> masked -> unmask:
  **6 round trips**; the first secure sum (per-row counters) yields the row set U, the
  second sums the values over U only.

Local training and the key advertisement share a round trip; the share exchange cannot
share one with the masked upload, because an organisation must know who shared before it
masks (else a neighbour that vanished before sharing leaves a mask nobody can remove).

Any fault of one organisation (a malformed, oversized or missing reply, a bad share) is
logged and recorded under its name, and the round goes on without it as a dropout. If the
secure sum cannot be finished (:class:`fedembed.secagg.protocol.RoundAbandoned`), the round
is abandoned: tables unchanged, logged, and the next round runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedembed.secagg.client import phases_for
from fedembed.secagg.graph import default_neighbours, default_threshold
from fedembed.secagg.primitives import CryptoError
from fedembed.secagg.protocol import ProtocolError, RoundAbandoned, ServerSession, session_context
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
    from fedembed.coordinator import Coordinator

log = logging.getLogger(__name__)

_FAULTS = (UpdateError, ProtocolError, CryptoError, KeyError, TypeError, ValueError)


class SecureRound:
    """One round of secure aggregation driven through the coordinator's transport.

    Parameters
    ----------
    coord : Coordinator
        The coordinator (config, transport, tables, log, reply validation).
    round_ : int
        The round.
    entry : dict
        The round's log entry (stages, bytes, rejections are recorded in it).
    """

    def __init__(self, coord: Coordinator, round_: int, entry: dict) -> None:
        self.coord = coord
        self.cfg = coord.cfg
        self.round = round_
        self.entry = entry
        self.shapes = dict(coord.shapes)
        self.context = session_context(self.cfg.run_key(), round_)
        self.phases = phases_for(self.cfg.row_set)
        self.session: ServerSession | None = None
        self.org_of: dict[int, str] = {}

    # ------------------------------------------------------------------ plumbing
    def _config(self, stage: str, n: int) -> ConfigRecord:
        c = self.cfg
        return ConfigRecord(
            {
                "stage": stage,
                "round": self.round,
                "run_key": c.run_key(),
                "task": c.task.to_json(),
                "n": n,
                "clip_delta": float(c.delta_clip),
                "max_weight": float(c.train.max_row_weight),
                "wire_dtype": c.wire_dtype,
                "row_set": c.row_set,
                "drop": json.dumps(c.drop),
                "shapes": json.dumps({k: list(v) for k, v in self.shapes.items()}),
            }
        )

    def _exchange(self, stage: str, contents: dict[int, RecordDict], handle: Callable[[int, RecordDict], None]) -> None:
        """Send a stage and hand each valid reply to ``handle`` as it arrives; account bytes and seconds.

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
            info = rep.content["info"] if "info" in rep.content else {}
            if size > self.cfg.max_message_bytes:
                self._fault(rep.node, f"{stage}: reply of {size} bytes exceeds the limit of {self.cfg.max_message_bytes}")
            elif info.get("status") != "ok":
                self._fault(rep.node, f"{stage}: {info.get('error', 'status ' + repr(info.get('status')))}")
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

    def _fault(self, node: int, reason: str) -> None:
        org = self.org_of.get(node, self.coord.node_org.get(node, f"node {node}"))
        self.entry["rejected"][org] = reason
        log.warning("round %d: %s left the secure round: %s", self.round, org, reason)

    # ------------------------------------------------------------------ stages
    def run(self, nodes: list[int]) -> AggregateSum | None:
        """Run the round's stages; returns the per-row sums, or None if the round was abandoned."""
        try:
            return self._run(nodes)
        except RoundAbandoned as exc:
            self.entry["abandoned"] = str(exc)
            log.warning("round %d abandoned, tables unchanged: %s", self.round, exc)
            return None

    def _train(self, nodes: list[int]) -> tuple[dict[int, dict[str, bytes]], dict[int, RowSet]]:
        coord, entry = self.coord, self.entry
        t0 = time.perf_counter()
        contents = {n: coord._message(n, self.round, False) for n in nodes}
        down = sum(record_bytes(c) for c in contents.values())
        up_before = entry["upload_bytes"]
        replies = coord.transport.exchange("train", contents, self.cfg.round_timeout)
        adverts, rows = {}, {}
        for rep in replies:
            org, _, _, _ = coord._read_reply(rep, entry, self.round - 1)
            self.org_of[rep.node] = org
            if org in entry["rejected"] or rep.content is None:
                continue
            try:
                sec = rep.content["secagg"]
                adverts[rep.node] = {k: bytes(sec[k]) for k in sec.keys()}
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
        n = len(adverts)
        k = cfg.neighbours or default_neighbours(n)
        t = cfg.threshold or default_threshold(min(k, n - 1))
        s = ServerSession(self.context, self.phases, adverts, k, t, seed=cfg.seed * 1_000_003 + self.round)
        self.session = s
        for node, reason in s.faults.items():
            self._fault(node, reason)
        self.entry["secure"] = {"row_set": cfg.row_set, "parties": n, "neighbours": min(k, n - 1), "threshold": s.threshold}

        # share
        contents = {}
        for p in s.parties:
            sec = {"party": p, "threshold": s.threshold}
            for q, adv in s.share_request(p).items():
                sec.update({f"adv.{q}.{f}": v for f, v in adv.items()})
            contents[s.node_of[p]] = RecordDict({"config": self._config("share", n), "secagg": ConfigRecord(sec)})
        shares: dict[int, dict[int, bytes]] = {}

        def take_shares(node: int, c: RecordDict) -> None:
            shares[s.party_of[node]] = {int(q): bytes(v) for q, v in c["shares"].items()}

        self._exchange("share", contents, take_shares)
        s.route_shares(shares)
        for node, reason in s.faults.items():
            if self.org_of.get(node, f"node {node}") not in self.entry["rejected"]:
                self._fault(node, reason)

        total, rowset = None, None
        active = sorted(s.u2)
        first = True
        for phase in self.phases:
            if phase == "indicators":
                stage, unstage = "indicators", "unmask_indicators"
                length, dtype = indicator_length(self.shapes), indicator_dtype(n)
            else:
                stage, unstage = "masked", "unmask"
                if cfg.row_set == "dense":
                    rowset = dense_rowset(self.shapes)
                elif cfg.row_set == "revealed":
                    rowset = union_of([revealed[s.node_of[p]] for p in active if s.node_of[p] in revealed], self.shapes)
                length, dtype = values_length(rowset, self.shapes), np.uint32
            contents = {}
            for p in active:
                u2, cts = s.masked_request(p)
                c = RecordDict({"config": self._config(stage, n), "secagg": ConfigRecord({"u2": u2})})
                if first:
                    c["shares"] = ConfigRecord({str(q): ct for q, ct in cts.items()})
                if phase == "values" and cfg.row_set != "dense":
                    c["rowset"] = encode_arrays({name: ids.astype(np.int32) for name, ids in rowset.items()})
                contents[s.node_of[p]] = c
            first = False
            self._exchange(
                stage,
                contents,
                lambda node, c: s.add_masked(phase, s.party_of[node], array_view(c["masked"]["vector"]), length, dtype),
            )
            del contents
            delivered = sorted(s.delivered[phase])
            if len(delivered) < minimum:
                raise RoundAbandoned(f"phase {phase}: {len(delivered)} vectors delivered, {minimum} needed")
            contents = {}
            for p in delivered:
                alive, dropped = s.unmask_request(phase, p)
                contents[s.node_of[p]] = RecordDict(
                    {"config": self._config(unstage, n), "secagg": ConfigRecord({"alive": alive, "dropped": dropped})}
                )
            responses: dict[int, dict[str, bytes]] = {}

            def take_unmask(node: int, c: RecordDict) -> None:
                responses[s.party_of[node]] = {k: bytes(v) for k, v in c["unmask"].items()}

            self._exchange(unstage, contents, take_unmask)
            t_finish = time.perf_counter()
            total = s.finish(phase, responses, length, dtype, minimum)
            self.entry["stages"][unstage]["seconds"] += time.perf_counter() - t_finish  # mask removal
            if phase == "indicators":
                rowset, counts = rowset_from_counts(total, self.shapes)
                self.entry["secure"]["union_rows"] = int(sum(ids.size for ids in rowset.values()))
                active = delivered  # only those whose rows are in U may send values
        self.entry["secure"]["rows"] = int(sum(ids.size for ids in rowset.values()))
        self.entry["clients"] = len(s.delivered["values"])
        scales = ValueScales(n=n, clip_delta=cfg.delta_clip, max_weight=cfg.train.max_row_weight)
        self.entry["secure"]["error_bound"] = scales.bound()
        try:
            return decode_values(total, rowset, self.shapes, scales)
        except UpdateError as exc:
            raise RoundAbandoned(f"the secure sum does not decode: {exc}") from exc


def run_secure_round(coord: Coordinator, round_: int, nodes: list[int], entry: dict) -> AggregateSum | None:
    """Run one secure round (see :class:`SecureRound`); None when abandoned."""
    return SecureRound(coord, round_, entry).run(nodes)

