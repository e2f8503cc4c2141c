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


def test_a_cancel_vector_that_removes_anothers_row_abandons_the_round(tmp_path, direct_transport, monkeypatch):
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
    c.run()
    entry = c.log.rounds[0]
    assert "org-0 reports that rows it touched are missing from U" in entry["abandoned"]
    assert np.array_equal(c.tables.tables["ids"], before)


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
