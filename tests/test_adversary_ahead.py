"""A malicious coordinator against sessions set up ahead, and against the neighbour graph.

A secure round's session is set up during the previous round (its advert in the previous
``train`` reply, its share exchange on the previous ``check`` message), and the round's
own ``train`` reply carries the masked update (:mod:`fedembed.secagg.server`). Each test
plays one attack on that overlap, or on the graph the coordinator used to draw itself,
against the real organisation code.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from secagg_harness import Harness, random_vectors

from conftest import run_config
from fedembed.coordinator import Coordinator, Reply
from fedembed.org import handle_content
from fedembed.secagg.protocol import ProtocolError, SecurePolicy
from fedembed.task import TaskSpec
from fedembed.wire import decode_arrays, encode_arrays


def synthetic(orgs=4, rows=3000):
    return TaskSpec("synthetic", {"orgs": orgs, "seed": 0, "rows": rows, "dim": 4})


class Network:
    """A DirectTransport whose coordinator side ``on(message_type, node, content, deliver)`` may rewrite,
    repeat or withhold messages."""

    def __init__(self, inner, on):
        self.inner, self.on, self.roster = inner, on, inner.roster

    def node_ids(self, minimum, timeout):
        return self.inner.node_ids(minimum, timeout)

    def exchange(self, message_type, contents, timeout):
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type, contents, timeout):
        for node, content in contents.items():
            def deliver(c, node=node):
                return handle_content(self.inner.orgs[node], c, message_type, node)

            reply = self.on(message_type, node, content, deliver)
            yield Reply(node, reply, None if reply is not None else "withheld")


def _with(content: RecordDict, **records) -> RecordDict:
    return RecordDict({**dict(content.items()), **records})


# ------------------------------------------------------------------ the graph
def test_neighbours_the_coordinator_chose_instead_of_the_sessions_graph_are_refused():
    """The graph is drawn from the session and its parties; handing a target other (valid, signed) neighbours,
    say the ones it colludes with or will claim dropped, is refused before anything is shared."""
    h = Harness(9, k=4)
    s, me = h.server, h.ids[1]
    genuine = s.share_request(1)
    others = [q for q in s.parties if q != 1 and q not in genuine][: len(genuine)]
    chosen = {q: s.adverts[q] for q in others}
    with pytest.raises(ProtocolError, match="not the ones the session's graph gives us"):
        h.clients[1].make_shares(me, h.policy, s.parties, s.threshold, chosen, s.k)
    with pytest.raises(ProtocolError, match="not the ones the session's graph gives us"):  # nor a graph of another k
        h.clients[1].make_shares(me, h.policy, s.parties, s.threshold, genuine, s.k + 2)
    assert h.clients[1].received == {}
    h.clients[1].make_shares(me, h.policy, s.parties, s.threshold, genuine, s.k)  # the session's own passes


def test_dropping_a_targets_neighbours_for_everyone_alike_isolates_nothing():
    """Sparse graph (k = 4 of 9). The coordinator tells every party the same lists: two of the target's
    neighbours 'never shared' (U2 without them) and the other two 'dropped' (U3 without them). The lists are
    consistent, so the consistency check passes; but then the target's vector would have no pairwise mask left
    that the coordinator cannot strip. The target counts every neighbour missing from U3, shared or not, and
    refuses to sign: its seed is never revealed."""
    h = Harness(9, k=4)
    s = h.server
    target = 1
    q1, q2, q3, q4 = s.graph[target]
    h.share()
    u2 = [p for p in s.parties if p not in (q3, q4)]
    cts = {p: {src: ct for src, ct in s.routed.get(p, {}).items() if src in u2} for p in u2}
    for p in u2:
        h.clients[p].accept_shares(h.roster, u2, cts[p])
    vectors = random_vectors(9, 16)
    for p in u2:
        h.deliver(p, vectors[p])
    u3 = [p for p in u2 if p not in (q1, q2)]
    target_missing = {q1, q2, q3, q4} - set(u3)
    assert len(target_missing) == 4 > h.policy.max_dropouts(4, s.threshold)
    with pytest.raises(ProtocolError, match="4 of our 4 neighbours missing from U3"):
        h.clients[target].sign_check(h.ids[target], h.policy, "values", u3)
    with pytest.raises(ProtocolError, match="out of order"):  # and so it never gets to reveal anything
        h.clients[target].unmask(h.ids[target], h.policy, "values", {})


# ------------------------------------------------------------------ sessions set up ahead
def _coordinator(tmp_path, direct_transport, on, rounds=2, row_set="dense", orgs=4, check="always"):
    t = direct_transport(tmp_path, orgs, task=synthetic(orgs))
    net = Network(t, on)
    c = Coordinator(run_config(synthetic(orgs), rounds=rounds, secure=True, row_set=row_set, consistency_check=check), net)
    return t, c


def test_a_round_whose_plan_differs_from_the_session_set_up_for_it_is_refused(tmp_path, direct_transport):
    """The session of round 2 was made during round 1 with round 1's encoding; a round-2 plan with another
    clip (which would change how the update is scaled under the same masks) gets a refusal, not a vector."""
    seen = {}

    def change_clip(message_type, node, content, deliver):
        if message_type == "train" and node == 101 and int(content["config"]["round"]) == 2:
            cfg = dict(content["config"])
            cfg["delta_clip"] = 0.5
            seen["reply"] = deliver(_with(content, config=ConfigRecord(cfg)))
            return seen["reply"]
        return deliver(content)

    _, c = _coordinator(tmp_path, direct_transport, change_clip)
    c.run()
    info = seen["reply"]["info"]
    assert info["status"] == "refused" and "differs from the session set up for it (['clip_delta'])" in info["error"]
    assert "masked" not in seen["reply"]
    entry = c.log.rounds[1]
    assert entry["secure"]["set_up_ahead"] and entry["clients"] == 3 and "abandoned" not in entry


def test_a_train_message_of_a_session_set_up_ahead_delivered_twice_masks_once(tmp_path, direct_transport):
    replies = {}

    def twice(message_type, node, content, deliver):
        first = deliver(content)
        if message_type == "train" and node == 102 and int(content["config"]["round"]) == 2:
            replies["again"] = deliver(content)
        return first

    _, c = _coordinator(tmp_path, direct_transport, twice)
    c.run()
    again = replies["again"]
    assert again["info"]["status"] == "refused" and "already answered" in again["info"]["error"]
    assert "masked" not in again
    assert "abandoned" not in c.log.rounds[1] and c.log.rounds[1]["clients"] == 4


def test_the_next_rounds_share_request_is_answered_once(tmp_path, direct_transport):
    """Round 1's check message carries round 2's share request; replayed, the share part is refused (the
    round-2 session has shared) and round 1's own part finds its session spent."""
    kept = {}

    def keep(message_type, node, content, deliver):
        if message_type == "train.check" and node == 101:
            kept.setdefault(int(content["config"]["round"]), content)
        return deliver(content)

    t, c = _coordinator(tmp_path, direct_transport, keep)
    c.run_round(1, sorted(t.orgs))
    assert "next" in kept[1]
    replay = handle_content(t.orgs[101], kept[1], "train.check", 101)
    assert replay["info"]["status"] == "error"  # round 1's session is gone: nothing is signed again
    part = handle_content(t.orgs[101], RecordDict({"config": kept[1]["config"], "next": kept[1]["next"]}),
                          "train.check", 101)
    assert part["info"]["status"] == "ok" and "next_shares" not in part
    assert "already answered" in part["next_error"]["error"]


def test_a_union_row_set_agreed_ahead_that_leaves_out_an_orgs_rows_gets_the_reply_any_u_gets(tmp_path, direct_transport,
                                                                                             caplog):
    """U for round 2 was agreed in round 1 (the indicators of every party's training rows). A coordinator that
    sends one party a U without half of its rows learns nothing from its reply: the party masks its update over
    that U, leaving those rows out (its own log says how many), and answers as any party does. A refusal, as
    before, told the coordinator whether the U it chose missed a row the party touched: one answer per U tried,
    enough to find, by group testing, which rows the party touched."""
    replies = {}

    def drop_rows(message_type, node, content, deliver):
        if message_type == "train" and node in (102, 103) and "rowset" in content:
            if node == 103:
                rs = decode_arrays(content["rowset"])
                rs["ids"] = rs["ids"][::2]
                content = _with(content, rowset=encode_arrays(rs))
            replies[node] = deliver(content)
            return replies[node]
        return deliver(content)

    _, c = _coordinator(tmp_path, direct_transport, drop_rows, row_set="union")
    with caplog.at_level("WARNING", logger="fedembed.secagg.client"):
        c.run()
    target, other = replies[103], replies[102]
    assert target["info"]["status"] == other["info"]["status"] == "ok"
    assert set(target.keys()) == set(other.keys())  # the same records, a masked vector among them
    assert "masked" in target and "error" not in target["info"]
    assert any(r.message.startswith("org-3: secure aggregation: ") and "are not in the row set U" in r.message
               and "left out of this round" in r.message for r in caplog.records)
    assert not any(r.message.startswith("org-2: secure aggregation: ") for r in caplog.records)


def test_a_session_set_up_ahead_that_the_coordinator_lost_is_replaced_by_fresh_keys(tmp_path, direct_transport):
    """A coordinator that restarts between rounds has lost round 2's set-up; round 2 then starts its own
    session: every organisation makes fresh keys (the keys made ahead are never used) and the sum is exact."""
    adverts = {}

    def keep(message_type, node, content, deliver):
        reply = deliver(content)
        if message_type == "train" and node == 101 and reply is not None:
            r = int(content["config"]["round"])
            if "next" in reply:
                adverts[("ahead", r + 1)] = bytes(reply["next"]["enc"])
            if "secagg" in reply:
                adverts[("own", r)] = bytes(reply["secagg"]["enc"])
        return reply

    t, c = _coordinator(tmp_path, direct_transport, keep, rounds=3)
    c.run_round(1, sorted(t.orgs))
    c.secure.prepared = None  # what a restarted coordinator has
    entry = c.run_round(2, sorted(t.orgs))
    assert not entry["secure"]["set_up_ahead"] and "abandoned" not in entry and entry["clients"] == 4
    assert adverts[("own", 2)] != adverts[("ahead", 2)]
    assert c.run_round(3, sorted(t.orgs))["secure"]["set_up_ahead"]  # and the next round is set up ahead again


@pytest.mark.parametrize("check, early, trips", [("always", True, 3), ("auto", False, 2), ("auto", True, 1)])
def test_rounds_set_up_ahead_take_one_two_or_three_round_trips_and_sum_exactly(tmp_path, direct_transport, check, early,
                                                                                 trips):
    """Steady rounds: train, check, unmask (check always); train, unmask (no early unmask); train alone (the default)."""
    from test_secagg_protocol import _run

    plain = _run(tmp_path / "plain", direct_transport, False, rounds=3)
    for row_set in ("dense", "union", "revealed"):
        secure = _run(tmp_path / row_set, direct_transport, True, row_set, rounds=3, consistency_check=check,
                      early_unmask=early)
        stages = [[s for s in r["stages"] if s != "aggregate"] for r in secure.log.rounds]
        ahead = {3: ["train", "check", "unmask"], 2: ["train", "unmask"], 1: ["train"]}[trips]
        assert stages[1] == stages[2] == ahead, (row_set, stages)
        first = max(trips, 2)  # a session started with its round: the early unmask needs a session set up ahead
        assert len(stages[0]) == (8 if row_set == "union" else 5) - (3 - first) * (2 if row_set == "union" else 1)
        assert [r["secure"]["set_up_ahead"] for r in secure.log.rounds] == [False, True, True]
        assert [bool(r["secure"].get("early_unmask")) for r in secure.log.rounds] == [False, trips == 1, trips == 1]
        assert all("abandoned" not in r for r in secure.log.rounds)
        assert np.array_equal(plain.tables.tables["ids"], secure.tables.tables["ids"]), row_set  # bit-identical


def test_a_policy_that_needs_more_neighbours_than_the_graph_gives_refuses_the_set_up_ahead_too(tmp_path, direct_transport):
    """The share request of a session set up ahead is held to the organisation's policy like any other."""
    t = direct_transport(tmp_path, 4, task=synthetic(4), policy=SecurePolicy(min_neighbours=5))
    c = Coordinator(run_config(synthetic(4), rounds=2, secure=True, row_set="dense"), t)
    c.run()
    assert all("abandoned" in r for r in c.log.rounds)  # 3 neighbours < 5: nobody shares, in either kind of session
    assert all(c.log.rounds[i]["secure"]["set_up_ahead"] is False for i in (0, 1) if "secure" in c.log.rounds[i])


# ------------------------------------------------------------------ the consistency check skipped
def _masked(h, parties, vectors):
    for p in parties:
        h.deliver(p, vectors[p])


def test_an_unmask_without_the_check_after_a_dropout_reveals_nothing():
    """Nobody may skip the check once someone who shared is missing from U3: a mask key may be needed, and
    keys are only ever revealed behind a majority-signed statement."""
    h = Harness(5)
    h.share()
    for p in h.clients:
        h.accept(p)
    vectors = random_vectors(5, 8)
    _masked(h, [1, 2, 3, 4], vectors)  # party 5 shared, then vanished
    u3 = [1, 2, 3, 4]
    with pytest.raises(ProtocolError, match="U3 is not every party that shared"):
        h.clients[1].unmask_fast(h.ids[1], h.policy, u3, {"values": b""})
    assert h.clients[1].revealed == {}


def test_skipping_the_check_is_refused_unless_the_whole_roster_holds_every_share():
    """A sparse graph, or a session of part of the roster, gives the coordinator room to combine seed shares
    from some and key shares from others: there the check is never skipped."""
    sparse = Harness(9, k=4)
    sparse.share()
    for p in sparse.clients:
        sparse.accept(p)
    _masked(sparse, list(sparse.clients), random_vectors(9, 8))
    with pytest.raises(ProtocolError, match="not complete"):
        sparse.clients[1].unmask_fast(sparse.ids[1], sparse.policy, sorted(sparse.clients), {"values": b""})

    part = Harness(5, absent=1)  # the roster has 6; a session of 5 of them, complete among themselves
    part.share()
    for p in part.clients:
        part.accept(p)
    _masked(part, list(part.clients), random_vectors(5, 8))
    with pytest.raises(ProtocolError, match="not the whole roster"):
        part.clients[1].unmask_fast(part.ids[1], part.policy, sorted(part.clients), {"values": b""})


def test_skipping_the_check_needs_a_threshold_above_half_the_roster_and_its_colluders():
    h = Harness(5, t=3)  # 3 of 5 is a majority, but with 1 colluder the bound is floor((5 + 1) / 2) + 1 = 4
    h.share()
    for p in h.clients:
        h.accept(p)
    _masked(h, list(h.clients), random_vectors(5, 8))
    with pytest.raises(ProtocolError, match="threshold 3 below the 4"):
        h.clients[1].unmask_fast(h.ids[1], SecurePolicy(colluders=1), sorted(h.clients), {"values": b""})
    shares = h.clients[2].unmask_fast(h.ids[2], h.policy, sorted(h.clients), {"values": b""})  # colluders 0: allowed
    assert all(k.startswith("seed.") for k in shares["values"])


def test_seeds_revealed_without_the_check_leave_no_majority_for_a_statement_that_reveals_keys():
    """The coordinator gets seed shares from three organisations without a check, then tries to run the check
    with the other two, claiming party 5 dropped (to get its mask key too). Those that skipped the check can
    never sign, and party 5 will not sign its own absence: one signature is no majority of five, and no key
    share is revealed."""
    h = Harness(5)
    s = h.server
    h.share()
    for p in h.clients:
        h.accept(p)
    _masked(h, list(h.clients), random_vectors(5, 8))
    for p in (1, 2, 3):
        h.clients[p].unmask_fast(h.ids[p], h.policy, sorted(h.clients), {"values": b""})
    with pytest.raises(ProtocolError, match="already answered"):
        h.clients[1].sign_check(h.ids[1], h.policy, "values", [1, 2, 3, 4])
    lie = [1, 2, 3, 4]  # "party 5 dropped"
    sigs = {p: h.clients[p].sign_check(h.ids[p], h.policy, "values", lie) for p in (4,)}
    with pytest.raises(ProtocolError, match="U3 leaves us out"):
        h.clients[5].sign_check(h.ids[5], h.policy, "values", lie)
    with pytest.raises(ProtocolError, match="only 1 valid signatures on our view of phase values, 3 needed"):
        h.clients[4].unmask(h.ids[4], h.policy, "values", sigs | {5: b"forged"})
    assert not any(v == "key" for c in h.clients.values() for v in c.revealed.values())


# ------------------------------------------------------------------ sessions that unmask early (one round trip)
def test_an_organisation_that_unmasked_early_never_reveals_a_mask_key_of_that_session(tmp_path, direct_transport):
    """Round 2 unmasks early: each train reply carries seed shares only, with the masked update. A coordinator
    that then claims a party dropped and asks for the check or the unmask of that session (the 'dropped'
    party's mask key would strip its pairwise masks and, with its seed, leave its vector bare) gets refusals:
    the session is spent, and nothing is revealed."""
    from fedembed.config import StageHeader

    kept = {}

    def keep(message_type, node, content, deliver):
        reply = deliver(content)
        if message_type == "train" and int(content["config"]["round"]) == 2:
            kept[node] = reply
        return reply

    t, c = _coordinator(tmp_path, direct_transport, keep, rounds=3, check="auto")
    nodes = sorted(t.orgs)
    c.run_round(1, nodes)
    entry = c.run_round(2, nodes)
    assert entry["secure"]["early_unmask"] and "abandoned" not in entry
    assert [s for s in entry["stages"] if s != "aggregate"] == ["train"]
    assert kept[101]["unmask"].keys() and all(k.split(".")[1] == "seed" for k in kept[101]["unmask"].keys())
    header = ConfigRecord(StageHeader(round=2, run_key=c.cfg.run_key(), drop="{}").to_config())
    sigs = {f"sig.values.{p}": b"\0" * 64 for p in (1, 2, 3)}
    for stage, sec in (("check", {"u3": [1, 2, 3]}), ("unmask", {"u3": [1, 2, 3], "fast": True}), ("unmask", sigs)):
        reply = handle_content(t.orgs[101], RecordDict({"config": header, "secagg": ConfigRecord(sec)}), f"train.{stage}", 101)
        assert reply["info"]["status"] == "error" and "no secure-aggregation session of round 2" in reply["info"]["error"]
        assert "unmask" not in reply and "check" not in reply


def test_a_dropout_in_a_round_that_unmasks_early_abandons_it_and_the_next_round_recovers(tmp_path, direct_transport):
    """An organisation that shared for round 2 and then vanished leaves masks nobody will remove (no mask key
    of an early-unmasked session is revealed): round 2 is abandoned, tables unchanged, naming it; round 3
    starts its own session, which recovers dropouts, and sums exactly."""
    t = direct_transport(tmp_path, 4, task=synthetic(4))
    c = Coordinator(run_config(synthetic(4), rounds=3, secure=True, row_set="union", drop={"masked@2": [1]}), t)
    nodes = sorted(t.orgs)
    c.run_round(1, nodes)
    before = c.tables.tables["ids"].copy()
    second = c.run_round(2, nodes)
    assert second["secure"]["set_up_ahead"] and "shared but did not deliver" in second["abandoned"]
    assert "org-1" in second["abandoned"] and np.array_equal(c.tables.tables["ids"], before)
    third = c.run_round(3, nodes)
    assert not third["secure"]["set_up_ahead"] and "abandoned" not in third and third["clients"] == 4


def test_a_coordinator_that_switches_early_unmask_off_mid_session_is_refused(tmp_path, direct_transport):
    """Whether a session unmasks early is fixed when it is made, like every other parameter: a round-2 plan
    that says otherwise gets a refusal, not a vector."""
    seen = {}

    def switch(message_type, node, content, deliver):
        if message_type == "train" and node == 101 and int(content["config"]["round"]) == 2:
            cfg = dict(content["config"])
            cfg["early_unmask"] = False
            seen["reply"] = deliver(_with(content, config=ConfigRecord(cfg)))
            return seen["reply"]
        return deliver(content)

    _, c = _coordinator(tmp_path, direct_transport, switch, rounds=2, check="auto")
    c.run()
    info = seen["reply"]["info"]
    assert info["status"] == "refused" and "(['early_unmask'])" in info["error"] and "masked" not in seen["reply"]
    assert "shared but did not deliver" in c.log.rounds[1]["abandoned"]


def test_the_share_request_that_rides_on_train_is_answered_once_and_only_for_the_next_round(tmp_path, direct_transport):
    """Round 2's train message carries round 3's share request. Replayed, the share part is refused (round 3's
    session has shared); a request for a round whose session was never made is refused too."""
    kept = {}

    def keep(message_type, node, content, deliver):
        if message_type == "train" and node == 101:
            kept[int(content["config"]["round"])] = content
        return deliver(content)

    t, c = _coordinator(tmp_path, direct_transport, keep, rounds=4, check="auto")
    nodes = sorted(t.orgs)
    c.run_round(1, nodes)
    c.run_round(2, nodes)
    assert "next" in kept[2]
    from fedembed.secagg.client import next_shares

    member = t.orgs[101].member
    again = next_shares(member, c.cfg.run_key(), 3, kept[2]["next"])
    assert "next_shares" not in again and "already answered" in again["next_error"]["error"]
    never = next_shares(member, c.cfg.run_key(), 9, kept[2]["next"])
    assert "next_shares" not in never and "no secure-aggregation session of round 9" in never["next_error"]["error"]
    assert "abandoned" not in c.run_round(3, nodes)  # and round 3 still runs on the session set up for it


@pytest.mark.parametrize("early", [True, False])
def test_a_coordinator_that_asks_for_a_rounds_update_again_in_another_session_is_refused(tmp_path, direct_transport,
                                                                                       early):
    """After round 2's sum over everyone, the coordinator sends round 2's train message again without the session
    set up for it, to start a second session for the same round and 'lose' the target in it: the difference of
    the two sums would be the target's update. Every organisation contributes to a round once, in increasing
    rounds: refused, signed, and no key advertisement (nothing to start a session with) leaves it."""
    kept = {}

    def keep(message_type, node, content, deliver):
        if message_type == "train":
            kept[(node, int(content["config"]["round"]))] = content
        return deliver(content)

    t, c = _coordinator(tmp_path, direct_transport, keep, rounds=3, check="auto")
    c.cfg = c.cfg.__class__(**{**c.cfg.__dict__, "early_unmask": early})
    nodes = sorted(t.orgs)
    c.run_round(1, nodes)
    assert "abandoned" not in c.run_round(2, nodes)
    for r in (2, 1):
        msg = kept[(101, r)]
        again = handle_content(t.orgs[101], RecordDict({"config": msg["config"], "sync": msg["sync"]}), "train", 101)
        assert again["info"]["status"] == "refused", dict(again["info"])
        assert f"round {r} refused: round 2 of this run was already answered" in again["info"]["error"]
        assert "secagg" not in again and "masked" not in again
    assert "abandoned" not in c.run_round(3, nodes)  # the run itself goes on
