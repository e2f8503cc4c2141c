"""A malicious coordinator and hostile organisations against secure aggregation.

Each test plays the attack it is named after, against the real organisation code: the
protocol state machines (:mod:`fedembed.secagg.protocol`, through ``secagg_harness``) or
the organisation's message handler and the coordinator's round through an in-process
transport that lets the test play the coordinator's network side.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from secagg_harness import Harness, random_vectors

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.identity import Identity, Roster
from fedembed.org import handle_content
from fedembed.secagg.primitives import SigningKey
from fedembed.secagg.protocol import (
    ClientSession,
    ProtocolError,
    SecurePolicy,
    advert_statement,
    share_statement,
)
from fedembed.task import TaskSpec
from fedembed.wire import decode_arrays, encode_arrays


def synthetic(orgs=4, rows=3000):
    return TaskSpec("synthetic", {"orgs": orgs, "seed": 0, "rows": rows, "dim": 4})


class EvilNetwork:
    """Wraps a DirectTransport: ``on(message_type, node, content, deliver)`` may deliver a message
    several times, change it, or keep the replies to itself (a malicious coordinator)."""

    def __init__(self, inner, on):
        self.inner, self.on, self.roster = inner, on, inner.roster
        self.extra: list[tuple[str, int, RecordDict]] = []

    def node_ids(self, minimum, timeout):
        return self.inner.node_ids(minimum, timeout)

    def exchange(self, message_type, contents, timeout):
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type, contents, timeout):
        for node, content in contents.items():
            def deliver(c, node=node):
                return handle_content(self.inner.orgs[node], c, message_type, node)

            yield from self.on(message_type, node, content, deliver, self)


def _with(content: RecordDict, **records) -> RecordDict:
    return RecordDict({**dict(content.items()), **records})


def _honest(message_type, node, content, deliver, net):
    from fedembed.coordinator import Reply

    yield Reply(node, deliver(content))


# ------------------------------------------------------------------ a coordinator that re-asks
@pytest.mark.parametrize("stage, row_set", [("masked", "dense"), ("indicators", "union"), ("masked", "union")])
def test_coordinator_reasking_a_masked_stage_gets_no_second_vector(tmp_path, direct_transport, stage, row_set):
    """Asked again (the same message; or another n, a fake 1-row table prepended to the shapes), the org
    refuses: one mask, one plaintext."""
    from fedembed.coordinator import Reply

    again = {}

    def reask(message_type, node, content, deliver, net):
        first = deliver(content)
        if message_type == f"train.{stage}" and node == 101:
            again["same"] = deliver(content)
            cfg = dict(content["config"])
            cfg.update({"n": 99, "shapes": '{"aaa": [1, 4], "ids": [3000, 4]}', "clip_delta": 1e-6})
            again["changed"] = deliver(_with(content, config=ConfigRecord(cfg)))
        yield Reply(node, first)

    net = EvilNetwork(direct_transport(tmp_path, 4, task=synthetic(4)), reask)
    c = Coordinator(run_config(synthetic(), rounds=1, secure=True, row_set=row_set), net)
    c.run()
    assert again["same"]["info"]["status"] == "error" and "already answered" in again["same"]["info"]["error"]
    changed = again["changed"]["info"]
    assert changed["status"] == "error"
    assert "fields outside its schema: ['clip_delta', 'n', 'shapes']" in changed["error"]  # parameters are never read
    assert all("masked" not in r for r in again.values())
    assert "abandoned" not in c.log.rounds[0]  # the honest round is unaffected


def test_no_neighbours_and_threshold_one_are_refused_and_the_own_seed_share_stays(tmp_path):
    h = Harness(5)
    c, me = h.clients[1], h.ids[1]
    with pytest.raises(ProtocolError, match="neighbours"):
        c.make_shares(me, h.policy, h.server.parties, 1, {}, h.server.k)
    with pytest.raises(ProtocolError, match="threshold 1 refused"):
        c.make_shares(me, h.policy, h.server.parties, 1, h.server.share_request(1), h.server.k)
    # and it cannot be asked for its own seed share before sharing, masking and checking
    with pytest.raises(ProtocolError, match="out of order"):
        c.unmask(me, h.policy, "values", {})
    assert c.received == {}


def test_a_lowered_threshold_is_refused(tmp_path):
    h = Harness(7)  # k = 6: 7 holders, a strict majority is 4
    c = h.clients[1]
    with pytest.raises(ProtocolError, match=r"threshold 3 refused: with 6 neighbours it must be in \[4, 7\]"):
        c.make_shares(h.ids[1], h.policy, h.server.parties, 3, h.server.share_request(1), h.server.k)
    c.make_shares(h.ids[1], h.policy, h.server.parties, 4, h.server.share_request(1), h.server.k)


def test_a_threshold_changed_after_sharing_is_never_read(tmp_path):
    """Every parameter is fixed at the share stage; the session has no way to take a new one."""
    h = Harness(4)
    h.share()
    fixed = h.clients[1].threshold
    with pytest.raises(ProtocolError, match="already answered"):
        h.clients[1].make_shares(h.ids[1], h.policy, h.server.parties, 1, h.server.share_request(1), h.server.k)
    assert h.clients[1].threshold == fixed


# ------------------------------------------------------------------ a coordinator that lies about lists
def test_telling_parties_different_stories_about_who_delivered_recovers_nothing():
    """The coordinator tells the target's holders 'everyone delivered' (they reveal its seed)
    and tells others 'party 2 dropped' (to get party 2's mask key and strip the pairwise mask
    of target and 2). Each honest party signs only its own view; neither view gathers a roster
    majority, so nobody reveals anything."""
    n = 5
    h = Harness(n)
    h.share()
    vectors = random_vectors(n, 64)
    for p in h.clients:
        h.accept(p)
        h.deliver(p, vectors[p])
    s = h.server
    everyone = sorted(s.delivered["values"])
    lie = [p for p in everyone if p != 2]
    story = {1: everyone, 3: everyone, 4: lie, 5: lie, 2: everyone}
    sigs = {p: h.clients[p].sign_check(h.ids[p], h.policy, "values", story[p]) for p in everyone}
    revealed = {}
    for p in everyone:
        try:
            revealed[p] = h.clients[p].unmask(h.ids[p], h.policy, "values", sigs)
        except ProtocolError as exc:
            assert "do not agree" in str(exc)
    # 'everyone' is signed by 1, 2, 3 (a majority of 5): those three unmask per that view;
    # 'lie' is signed by 4, 5 only: they refuse. No mask key of any party was revealed.
    assert sorted(revealed) == [1, 2, 3]
    assert not any(k.startswith("key.") for r in revealed.values() for k in r)


def test_a_target_told_that_only_two_neighbours_shared_gets_no_majority_for_its_view():
    n = 5
    h = Harness(n)
    h.share()
    s = h.server
    u2_all, cts = s.masked_request(1)
    small = [1, 2, 3]  # the lie told to party 1: only 2 and 3 shared
    h.clients[1].accept_shares(h.roster, small, {q: cts[q] for q in (2, 3)})
    h.clients[1].mask_vector("values", np.zeros(16, np.uint32))
    for p in range(2, n + 1):
        h.accept(p)
        h.clients[p].mask_vector("values", np.zeros(16, np.uint32))
    u3 = list(range(1, n + 1))
    with pytest.raises(ProtocolError, match="did not share"):  # the true U3 contradicts the lie it was told
        h.clients[1].sign_check(h.ids[1], h.policy, "values", u3)
    sigs = {p: h.clients[p].sign_check(h.ids[p], h.policy, "values", u3) for p in u3[1:]}
    sigs[1] = h.clients[1].sign_check(h.ids[1], h.policy, "values", small)  # a U3 that fits the lie
    with pytest.raises(ProtocolError, match="do not agree"):  # its statement holds its U2: only it signed it
        h.clients[1].unmask(h.ids[1], h.policy, "values", sigs)


def test_a_sybil_or_substituted_key_in_a_forwarded_advert_is_refused():
    h = Harness(4)
    c, me, req = h.clients[1], h.ids[1], h.server.share_request(1)
    # the coordinator swaps party 2's share-encryption key for one it holds
    forged = dict(req)
    forged[2] = {**req[2], "enc": ClientSession.new(h.context, ["values"]).enc.public}
    with pytest.raises(ProtocolError, match="not signed by its roster key"):
        c.make_shares(me, h.policy, h.server.parties, h.server.threshold, forged, h.server.k)
    # a Sybil: a party the coordinator made up, with a key of its own, signing as org-002
    sybil = SigningKey.generate()
    fake = ClientSession.new(h.context, ["values"])
    adv = fake.advert(Identity("org-002", sybil, Roster({"org-002": sybil.public})))
    with pytest.raises(ProtocolError, match="not signed by its roster key"):
        c.make_shares(me, h.policy, h.server.parties, h.server.threshold, {**req, 2: adv}, h.server.k)
    # or a party beyond the roster
    with pytest.raises(ProtocolError, match="outside the roster"):
        c.make_shares(me, h.policy, h.server.parties + [9], h.server.threshold, req, h.server.k)
    c.make_shares(me, h.policy, h.server.parties, h.server.threshold, req, h.server.k)  # the genuine ones pass


def test_a_copied_key_is_refused_by_the_organisation_too():
    h = Harness(4)
    req = h.server.share_request(1)
    me = h.clients[1]
    copied = {**req, 3: {**req[3], "mask.values": me.mask["values"].public}}  # claims our own mask key
    with pytest.raises(ProtocolError):
        me.make_shares(h.ids[1], h.policy, h.server.parties, h.server.threshold, copied, h.server.k)


def test_stage_messages_replayed_from_an_earlier_round_are_refused(tmp_path, direct_transport):
    from fedembed.coordinator import Reply

    kept, replies = {}, {}

    def keep(message_type, node, content, deliver, net):
        if node == 101:
            kept.setdefault(message_type, []).append(content)
        yield Reply(node, deliver(content))

    t = direct_transport(tmp_path, 4, task=synthetic(4))
    net = EvilNetwork(t, keep)
    c = Coordinator(run_config(synthetic(), rounds=2, secure=True, row_set="dense", consistency_check="always"), net)
    c.run_round(1, sorted(t.orgs))
    # round 2 (its session set up during round 1) up to its check stage, then the coordinator replays round 1's
    # share message, its check message (which carried round 2's share request) and its unmask message
    stop = {}

    def replay(message_type, node, content, deliver, net):
        if message_type == "train.check" and node == 101 and "done" not in stop:
            stop["done"] = True
            replies["replayed share"] = deliver(kept["train.share"][0])
            replies["replayed check"] = handle_content(t.orgs[101], kept["train.check"][0], "train.check", 101)
            replies["unmask first"] = handle_content(t.orgs[101], kept["train.unmask"][0], "train.unmask", 101)
        yield Reply(node, deliver(content))

    net.on = replay
    entry = c.run_round(2, sorted(t.orgs))
    assert entry["secure"]["set_up_ahead"]
    for what in ("replayed share", "replayed check", "unmask first"):
        info = replies[what]["info"]
        assert info["status"] == "error" and "round 1" in info["error"], what  # round 1's session is spent and gone
        assert set(replies[what].keys()) == {"info", "sig"}, what  # nothing else in the reply
    assert "abandoned" not in entry and entry["clients"] == 4


# ------------------------------------------------------------------ hostile organisations
def _hostile(t, node, fn):
    """Let org ``node`` rewrite its own replies of one stage and sign them with its own key."""
    t.tamper_gets_type = True
    t.tamper = lambda n, content, message_type: fn(content, message_type) if n == node else content


def _advert_resigned(t, node, content, change):
    sec = content["secagg"]
    adv = {k: sec[k] for k in sec.keys()}
    change(adv)
    ident = t.identities[node - 100]
    cfg_ctx = t._ctx  # set by the caller
    adv["sig"] = ident.sign(advert_statement(cfg_ctx, ident.name, adv, ["values"]))
    content["secagg"] = ConfigRecord(adv)
    return content


def test_low_order_and_copied_keys_are_refused_at_the_advertisement_naming_the_org(tmp_path, direct_transport):
    from fedembed.secagg.protocol import session_context

    low_order = bytes(32)  # the identity point: agreement gives zeros whatever the private key
    t = direct_transport(tmp_path, 5, task=synthetic(5))
    t._ctx = session_context(run_config(synthetic(5), rounds=1).run_key(), 1)
    adverts = {}

    def fn_low(content, message_type):
        if message_type == "train":
            return _advert_resigned(t, 101, content, lambda a: a.update({"enc": low_order}))
        return content

    _hostile(t, 101, fn_low)
    c = Coordinator(run_config(synthetic(5), rounds=1, secure=True, row_set="dense"), t)
    entry = c.run_round(1, sorted(t.orgs))
    assert "low-order" in entry["rejected"]["org-1"]
    assert "abandoned" not in entry and entry["clients"] == 4

    # org-2 copies org-1's mask key (e.g. learnt from a leak): nobody can tell who copied whom,
    # so both are named and both leave; the round goes on with the others
    t2 = direct_transport(tmp_path / "copy", 5, task=synthetic(5))
    t2._ctx = t._ctx

    def remember(n, content, message_type):
        if message_type == "train" and n == 101:
            adverts[101] = content["secagg"]["mask.values"]
        if message_type == "train" and n == 102:
            return _advert_resigned(t2, 102, content, lambda a: a.update({"mask.values": adverts[101]}))
        return content

    t2.tamper_gets_type, t2.tamper = True, remember
    c2 = Coordinator(run_config(synthetic(5), rounds=1, secure=True, row_set="dense"), t2)
    entry2 = c2.run_round(1, sorted(t2.orgs))
    assert "also advertise" in entry2["rejected"]["org-1"] and "also advertise" in entry2["rejected"]["org-2"]
    assert "abandoned" not in entry2 and entry2["clients"] == 3


def test_a_bad_share_names_its_sender_and_keeps_the_receiver(tmp_path, direct_transport):
    plain = Coordinator(run_config(synthetic(4), rounds=1), direct_transport(tmp_path / "plain", 4, task=synthetic(4)))
    plain.run()
    t = direct_transport(tmp_path, 4, task=synthetic(4))

    def garbage_for_party_1(content, message_type):
        if message_type == "train.share":
            ident = t.identities[2]
            cts = {k: content["shares"][k] for k in content["shares"].keys()}
            cts["1"] = bytes(len(cts["1"]))  # not a ciphertext at all, but signed by its sender
            cfg = t._share_ctx
            sigs = {q: ident.sign(share_statement(cfg, 3, int(q), ct)) for q, ct in cts.items()}
            content["shares"], content["share_sigs"] = ConfigRecord(cts), ConfigRecord(sigs)
        return content

    from fedembed.secagg.protocol import session_context

    t._share_ctx = session_context(run_config(synthetic(4), rounds=1).run_key(), 1)
    _hostile(t, 102, garbage_for_party_1)
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="union"), t)
    c.run()
    entry = c.log.rounds[0]
    assert "org-2" in entry["accused"] and "org-0" in entry["accused"]["org-2"]  # the sender, by the receiver
    assert entry["rejected"] == {} and entry["clients"] == 4  # nobody removed, the round completes
    assert np.array_equal(c.tables.tables["ids"], plain.tables.tables["ids"])


def test_a_hostile_org_adding_unbounded_values_gets_the_secure_round_abandoned(tmp_path, direct_transport, monkeypatch):
    """Clipping is the sender's job; skipping it (here: 2.5x the clip on every entry it sends) is caught
    by the bounds of the decoded sum, and the tables stay as they were."""
    orig = ClientSession.mask_group

    def skip_clipping(self, vectors):
        if self.name == "org-1" and "values" in vectors:
            vector = vectors["values"].view(np.int32).copy()
            vector[vector != 0] *= 3  # |w*delta| up to 3x the clip the others respect
            vectors = {**vectors, "values": vector.view(np.uint32)}
        return orig(self, vectors)

    monkeypatch.setattr(ClientSession, "mask_group", skip_clipping)
    t = direct_transport(tmp_path, 4, task=synthetic(4))
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="dense", delta_clip=0.001), t)
    before = c.tables.tables["ids"].copy()
    c.run()
    entry = c.log.rounds[0]
    assert "outside what honest organisations can send" in entry["abandoned"]
    assert np.array_equal(c.tables.tables["ids"], before)


def test_a_cancel_vector_that_removes_anothers_row_costs_only_those_rows(tmp_path, direct_transport, monkeypatch, caplog):
    """org-1 cancels the indicators of every row org-0 touched and org-1 did not: those rows leave U. org-0
    leaves their update out (its log says how many) and the round goes on with all four; a row that org-0
    alone touched keeps its value. (A refusal would tell a malicious coordinator which U misses org-0's rows.)"""
    orig = ClientSession.mask_group
    touched = {}

    def cancel(self, vectors):
        if "indicators" in vectors:
            vector = vectors["indicators"]
            touched[self.name] = np.flatnonzero(vector)
            if self.name == "org-1":  # -1 on every row org-0 touched and org-1 did not
                vector = vector.copy()
                own = set(np.flatnonzero(vector))
                for r in touched.get("org-0", []):
                    if r not in own:
                        vector[r] = np.uint8(255)
                vectors = {**vectors, "indicators": vector}
        return orig(self, vectors)

    monkeypatch.setattr(ClientSession, "mask_group", cancel)
    t = direct_transport(tmp_path, 4, task=synthetic(4))
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="union"), t)
    before = c.tables.tables["ids"].copy()
    with caplog.at_level("WARNING", logger="fedembed.secagg.client"):
        c.run()
    entry = c.log.rounds[0]
    assert "abandoned" not in entry and entry["clients"] == 4 and not entry["rejected"]
    assert any(r.message.startswith("org-0: secure aggregation: ") and "not in the row set U" in r.message
               for r in caplog.records)
    others = set().union(*(set(touched[n]) for n in ("org-1", "org-2", "org-3")))
    alone = [r for r in touched["org-0"] if r not in others]  # indicator positions: row ids of the one table
    assert alone  # the attack has rows to remove
    after = c.tables.tables["ids"]
    assert np.array_equal(after[alone], before[alone])  # their update was left out
    assert not np.array_equal(after, before)  # the others' was not


def test_an_org_whose_policy_excludes_revealed_mode_never_tells_its_rows(tmp_path, direct_transport):
    policy = SecurePolicy(row_sets=("dense", "union"))
    t = direct_transport(tmp_path, 4, task=synthetic(4), policy=policy)
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="revealed"), t)
    c.run_round(1, sorted(t.orgs))
    entry = c.log.rounds[0]
    # each refusal is signed, so it is filed under the organisation's roster name
    assert set(entry["rejected"]) == {f"org-{i}" for i in range(4)}
    assert all("refused the coordinator's message: row-set mode 'revealed'" in why for why in entry["rejected"].values())
    assert not any(isinstance(m, RecordDict) and "rows" in m for _, _, m in t.seen)


# ------------------------------------------------------------------ a coordinator that chooses U per organisation
def _u_of(t, node: int) -> np.ndarray:
    """The rows ``node`` touched this round (read from its own kept update: the test sees what the coordinator cannot)."""
    with np.load(t.orgs[node].state.dir / "secagg" / "1" / "update.npz") as z:
        return z["ids.ids"]


def test_a_coordinator_probing_which_rows_an_org_touched_gets_the_reply_any_u_gets(tmp_path, direct_transport):
    """At a union session's values stage, a U without some rows the target touched: the reply is the one any U
    gets (status ok, a masked vector) and asking again is refused. Before, the target refused with "N rows we
    touched are missing from U" and could be asked again with another U, as often as the coordinator liked:
    group testing recovered every row it touched (30 of 30 in 62 asks), what union mode hides."""
    from fedembed.coordinator import Reply

    got = {}

    def probe(message_type, node, content, deliver, net):
        if message_type == "train.masked" and node == 101:
            u = decode_arrays(content["rowset"])
            touched = _u_of(net.inner, node)
            u["ids"] = np.setdiff1d(u["ids"], touched[: touched.size // 2]).astype(np.int32)
            got["probe"] = deliver(_with(content, rowset=encode_arrays(u)))
            got["again"] = deliver(content)  # the same stage with the honest U: a second answer?
            yield Reply(node, got["probe"])
            return
        reply = deliver(content)
        if message_type == "train.masked" and node == 102:
            got["other"] = reply
        yield Reply(node, reply)

    t = direct_transport(tmp_path, 4, task=synthetic(4))
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="union"), EvilNetwork(t, probe))
    c.run_round(1, sorted(t.orgs))
    assert got["probe"]["info"]["status"] == got["other"]["info"]["status"] == "ok"
    assert set(got["probe"].keys()) == set(got["other"].keys()) and "masked" in got["probe"]
    assert got["again"]["info"]["status"] != "ok" and "already answered" in got["again"]["info"]["error"]


def test_a_target_shown_another_u_than_its_neighbours_adds_noise_not_its_value(tmp_path, direct_transport, monkeypatch):
    """After the indicator sum, the coordinator gives the target U + {e} (e above every row) and everyone else
    U + {d} (d an untouched row just below a row x that all of them touched): the same length, each U holding
    every row its receiver touched. The target then encodes row x where the others encode d (zero), so, with
    masks that cancel, the sum at x's slot is the target's own weight and w*delta. The pairwise masks are bound
    to U, so they cancel only where both parties masked over the same U: the slot is noise."""
    import fedembed.secagg.server as server
    from fedembed.secagg.vector import ValueScales

    st: dict = {}
    indicator_rowset, decode = server.SecureRound._indicator_rowset, server.SecureRound._decode

    def two_rowsets(self, s, total):
        rowset, counts = indicator_rowset(self, s, total)
        u = rowset["ids"]
        shared = set(st["touched"][101])
        for n in (100, 102, 103):
            shared &= set(st["touched"][n])
        x = min(r for r in shared if r - 1 >= 0 and r - 1 not in set(u))
        d, e = x - 1, int(u.max()) + 1
        st.update(u=u, x=x, d=d, target_u={"ids": np.sort(np.append(u, e))})
        c_o = dict(counts)
        c_o["ids"] = np.insert(counts["ids"], int(np.searchsorted(u, d)), 0)
        return {"ids": np.sort(np.append(u, d))}, c_o

    def keep_total(self, s, total, rowset, counts):
        st["total"], st["n"] = total.copy(), len(s.parties)
        return decode(self, s, total, rowset, counts)

    monkeypatch.setattr(server.SecureRound, "_indicator_rowset", two_rowsets)
    monkeypatch.setattr(server.SecureRound, "_decode", keep_total)

    def on(message_type, node, content, deliver, net):
        from fedembed.coordinator import Reply

        if message_type == "train.indicators":
            st.setdefault("touched", {})[node] = _u_of(net.inner, node)
            if node == 101:
                with np.load(net.inner.orgs[node].state.dir / "secagg" / "1" / "update.npz") as z:
                    st["own"] = {k: z[k] for k in ("ids.ids", "ids.weight")}
        if message_type == "train.masked" and node == 101:
            content = _with(content, rowset=encode_arrays({k: v.astype(np.int32) for k, v in st["target_u"].items()}))
        yield Reply(node, deliver(content))

    t = direct_transport(tmp_path, 4, task=synthetic(4))
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="union"), EvilNetwork(t, on))
    c.run_round(1, sorted(t.orgs))
    dim, slot, length = c.shapes["ids"][1], int(np.searchsorted(st["u"], st["x"])), st["u"].size + 1
    scales = ValueScales(n=st["n"], clip_delta=c.cfg.delta_clip, max_weight=c.cfg.train.max_row_weight)
    total = st["total"].view(np.int32).astype(np.float64)
    weight = total[length * dim + slot] / scales.weight_scale
    own = float(st["own"]["ids.weight"][np.flatnonzero(st["own"]["ids.ids"] == st["x"])[0]])
    assert abs(weight - own) > 0.01  # with the masks unbound, exactly the target's weight of row x (1.0)
    assert "outside what honest organisations can send" in c.log.rounds[0]["abandoned"]  # and the sum is noise


# ------------------------------------------------------------------ hostile organisations: malformed records
def _hostile_transport(tmp_path, tamper):
    from conftest import DirectTransport

    t = DirectTransport(tmp_path, 4, task=synthetic(4), tamper=tamper)
    t.tamper_gets_type = True
    return t


def test_a_signed_rows_missing_claim_costs_only_its_sender(tmp_path):
    """A refusal that says "RowsMissing" (in a dense round, where U is every row) abandoned every round: the
    coordinator believed it. It is a refusal like any other now: its sender leaves, the round goes on."""
    def claim(node, content, message_type):
        if node == 101 and message_type == "train.share":
            return RecordDict({"info": ConfigRecord({"status": "refused", "cache_version": 0,
                                                     "error": "RowsMissing: rows 1-5 of table 'ids' are missing"})})
        return content

    t = _hostile_transport(tmp_path, claim)
    c = Coordinator(run_config(synthetic(4), rounds=2, secure=True, row_set="dense", secure_ahead=False), t)
    c.run()
    for entry in c.log.rounds:
        assert "abandoned" not in entry and entry["clients"] == 3 and list(entry["rejected"]) == ["org-1"]


def test_an_integer_where_an_advert_key_goes_is_its_senders_fault_not_a_crash(tmp_path):
    """2**62 where a key goes: bytes() of it raised MemoryError, which ended the coordinator's run."""
    def big(node, content, message_type):
        if node == 101 and message_type == "train" and "secagg" in content:
            sec = content["secagg"]
            content["secagg"] = ConfigRecord({**{k: sec[k] for k in sec.keys()}, "enc": 2**62})
        return content

    c = Coordinator(run_config(synthetic(4), rounds=2, secure=True, row_set="dense"), _hostile_transport(tmp_path, big))
    c.run()
    assert "advert field 'enc' is a int, not bytes" in c.log.rounds[0]["rejected"]["org-1"]
    assert c.log.rounds[0]["clients"] == 3 and len(c.log.rounds) == 2


@pytest.mark.parametrize("record", ["masked", "unmask", "next_advert"])
def test_a_malformed_record_in_a_round_set_up_ahead_is_its_senders_fault_not_a_crash(tmp_path, record):
    """The masked update, the early seed shares and the next session's advert ride on round 2's train reply;
    each malformed (a config record for the vectors, integers for bytes) crashed the coordinator's run."""
    def malformed(node, content, message_type):
        if node == 101 and message_type == "train" and record in content:
            if record == "masked":
                content["masked"] = ConfigRecord({"values": 7})
            else:
                rec = content[record]
                content[record] = ConfigRecord({k: 2**62 if i == 0 else rec[k] for i, k in enumerate(rec.keys())})
        return content

    c = Coordinator(run_config(synthetic(4), rounds=4, secure=True, row_set="dense"),
                    _hostile_transport(tmp_path, malformed))
    c.run()
    assert len(c.log.rounds) == 4
    named = [e for e in c.log.rounds if "org-1" in e["rejected"]]
    assert named
    if record != "next_advert":  # that one is of a later session: org-1's update of this round is good
        assert all(e["clients"] <= 3 for e in named)


def test_a_reply_refused_in_part_is_refused_whole(tmp_path):
    """A malformed next-round share record, after a good masked update: the update was already in the sum
    while the log said org-1 had left. Every record is read before any is used now: org-1's vector is not in
    the sum, and since the others sent their seed shares with theirs (early unmask), the round is abandoned."""
    def bad_next(node, content, message_type):
        if node == 101 and message_type == "train" and "next_shares" in content:
            content["next_shares"] = ConfigRecord({"x": b"junk"})
        return content

    c = Coordinator(run_config(synthetic(4), rounds=3, secure=True, row_set="dense"),
                    _hostile_transport(tmp_path, bad_next))
    c.run()
    entry = c.log.rounds[1]
    assert "org-1" in entry["rejected"]
    assert "org-1 shared but did not deliver a masked update" in entry["abandoned"]


def test_a_weight_of_one_quantum_moves_a_row_by_the_clip_at_most_under_a_mean_step(tmp_path, direct_transport,
                                                                                   monkeypatch):
    """Inside its masked vector org-1 gives 50 rows nobody touched a weight of one quantum (~5e-10) and a
    weighted delta at the edge of the sum's rounding tolerance: the sum passes its bounds, and under a mean
    step (``sgd``) those rows moved by 12 with a clip of 4. Every mean is clipped to the clip when decoded."""
    from fedembed.secagg.vector import ValueScales

    clip, rows, dim = 4.0, 3000, 4
    orig, target = ClientSession.mask_group, {}

    def tiny_weights(self, vectors):
        if self.name == "org-1" and "values" in vectors:
            scales = ValueScales(n=4, clip_delta=clip, max_weight=1.0)
            ratio = clip * scales.data_scale / scales.weight_scale
            v = vectors["values"].view(np.int32).copy()
            data, w = v[: rows * dim].reshape(rows, dim), v[rows * dim:]
            target["rows"] = cold = np.flatnonzero(w == 0)[:50]
            w[cold] = 1
            data[cold] = int(np.floor(ratio * (1 + dim / 2) + dim / 2)) - 1
            vectors = {**vectors, "values": v.view(np.uint32)}
        return orig(self, vectors)

    monkeypatch.setattr(ClientSession, "mask_group", tiny_weights)
    t = direct_transport(tmp_path, 4, task=synthetic(4, rows))
    c = Coordinator(run_config(synthetic(4, rows), rounds=1, secure=True, row_set="dense", server_optimizer="sgd",
                               delta_clip=clip, secure_ahead=False), t)
    before = c.tables.tables["ids"].copy()
    c.run()
    assert c.log.rounds[0]["clients"] == 4 and "abandoned" not in c.log.rounds[0]
    moved = np.abs(c.tables.tables["ids"] - before)[target["rows"]]
    assert moved.max() <= clip * (1 + 1e-6)  # server_lr 1 x a mean within the clip
    assert moved.max() > clip * 0.99  # the attack still reaches the clip: within the bounds, as the README says


# ------------------------------------------------------------------ a coordinator that turns a secure run plain
def _plain_round_two(t, c, node: int = 100, run_key: str | None = None) -> RecordDict:
    """Round 2 of the same run as round 1 (or of ``run_key``), sent with ``secure`` off: the update in the clear."""
    message = c._message(node, 2, False)
    cfg = dict(message["config"])
    cfg["secure"] = False
    if run_key is not None:
        cfg["run_key"], cfg["since"] = run_key, 0  # "another run", from the start
    return handle_content(t.orgs[node], _with(message, config=ConfigRecord(cfg)), "train", node)


@pytest.mark.parametrize("policy", [SecurePolicy(), SecurePolicy(row_sets=("dense",))])
def test_a_secure_run_turned_plain_gets_no_update_in_the_clear(tmp_path, direct_transport, policy):
    """After a secure round, round 2 of the same run with secure off: every organisation refuses, whatever its
    policy (the run key does not say whether a run is secure; the organisation's own record of the run does).
    Before, it answered with its row ids, deltas and weights in the clear, even with a policy that refused to
    tell its row ids inside a secure round."""
    t = direct_transport(tmp_path, 4, task=synthetic(4), policy=policy)
    c = Coordinator(run_config(synthetic(4), rounds=1, secure=True, row_set="dense"), t)
    c.run()
    assert c.log.rounds[0]["clients"] == 4
    reply = _plain_round_two(t, c)
    assert reply["info"]["status"] == "refused" and "update" not in reply
    # its record of a secure contribution holds it, whatever its policy
    assert "a plain round after this organisation has contributed to a secure sum" in reply["info"]["error"]
    # the run key is the coordinator's: one character more was "another run", and the update came in the clear
    renamed = _plain_round_two(t, c, run_key=c.cfg.run_key() + " ")
    assert renamed["info"]["status"] == "refused" and "update" not in renamed


def test_control_a_plain_run_is_answered_in_the_clear_by_default(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 4, task=synthetic(4))
    c = Coordinator(run_config(synthetic(4), rounds=1), t)
    c.run()
    assert c.log.rounds[0]["clients"] == 4 and not c.log.rounds[0]["rejected"]


def test_an_org_that_requires_secure_rounds_refuses_every_plain_one(tmp_path, direct_transport):
    """Its own rule, from round 1 of a plain run on: nothing of its update leaves in the clear."""
    t = direct_transport(tmp_path, 4, task=synthetic(4), policy=SecurePolicy(require_secure=True))
    c = Coordinator(run_config(synthetic(4), rounds=1), t)
    c.run()
    entry = c.log.rounds[0]
    assert set(entry["rejected"]) == {f"org-{i}" for i in range(4)}
    assert all("secure rounds only (--require-secure)" in why for why in entry["rejected"].values())
    assert not any(isinstance(m, RecordDict) and "update" in m for _, _, m in t.seen)


def test_the_secure_policy_reads_secure_required_from_the_node_config():
    assert SecurePolicy.from_mapping({"secure-required": True}).require_secure
    assert SecurePolicy.from_mapping({"secure-required": "false"}).plain_allowed
    with pytest.raises(ValueError, match="secure-required must be true or false"):
        SecurePolicy.from_mapping({"secure-required": "yes"})


def test_fedembed_client_require_secure_reaches_the_policy_through_the_node_config():
    """What ``fedembed client --require-secure`` writes into the node config, parsed as Flower parses it."""
    from flwr.common.config import parse_config_args

    from fedembed.cli import build_parser, client_rules

    def policy(*flags):
        args = build_parser().parse_args(["client", "--state-dir", "s", "--roster", "r", "--task", "synthetic", *flags])
        return SecurePolicy.from_mapping(parse_config_args([" ".join(f"{k}={v}" for k, v in client_rules(args).items())]))

    assert not policy("--require-secure").plain_allowed
    assert policy().plain_allowed  # the control: plain rounds allowed by default (until a secure contribution)
    assert policy("--secure-row-sets", "dense,union").plain_allowed  # row sets rule secure rounds only
