"""A hostile organisation against the plain round: each test plays the attack it is named after.

Organisations are the real :class:`fedembed.org.Organisation` code behind an in-process
transport; the hostile one rewrites its own reply and signs it with its own key, as a
modified client would. The coordinator must trust nothing a reply says about itself.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.identity import SIG_RECORD, IdentityError, Roster, make_identities, sign_reply, verify_reply
from fedembed.org import handle_content
from fedembed.task import TaskSpec
from fedembed.wire import encode_arrays

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})


def run(tmp_path, transport, rounds=2, **kw):
    c = Coordinator(run_config(TASK, rounds=rounds, **kw), transport, state_dir=tmp_path / "coord")
    c.run()
    return c


def test_head_injected_in_a_plain_reply_is_refused_and_never_reaches_another_org(tmp_path, direct_transport):
    fake = {"head.0.weight": np.full((32, 16), 7.0, np.float32), "head.0.bias": np.zeros(32, np.float32)}

    def inject(node, content):
        if node == 101 and "update" in content:
            content["head"] = encode_arrays(fake)
        return content

    t = direct_transport(tmp_path, 3, task=TASK, tamper=inject)
    c = run(tmp_path, t, rounds=2)
    for r in c.log.rounds:
        assert "records outside the reply schema: ['head']" in r["rejected"]["org-1"]
        assert r["clients"] == 2
    # no message the coordinator sent carried a head, and every other org's head is its own
    assert not any(isinstance(m, dict) and "head" in m for _, _, m in t.seen)
    for node in (100, 102):
        saved = t.orgs[node].state.load_head()["head"]
        assert not any(np.array_equal(v.numpy(), fake.get(k, np.zeros(1))) for k, v in saved.items())


def test_org_refuses_a_head_sent_by_the_coordinator(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1), t)
    msg = c.train_message(100, 1)
    msg["head"] = encode_arrays({"head.0.weight": np.full((32, 16), 7.0, np.float32)})
    reply = handle_content(t.orgs[100], msg, "train", 100)
    assert reply["info"]["status"] == "refused" and "records outside its schema: ['head']" in reply["info"]["error"]
    assert verify_reply(reply, t.roster, c.cfg.run_key(), 1, "train", 100) == "org-0"  # signed: it says who refused
    assert t.orgs[100].state.load_head() is None  # nothing was trained on or saved
    del msg["head"]  # the control: the same message without the head is taken
    handle_content(t.orgs[100], msg, "train", 100)
    assert t.orgs[100].state.load_head() is not None


def test_org_impersonating_another_by_name_is_refused(tmp_path, direct_transport):
    """org-2 claims to be org-1 (info and signature name): its key does not verify as org-1's."""
    t = direct_transport(tmp_path, 3, task=TASK, resign=False)
    ids = t.identities

    def impersonate(node, content, message_type):
        if node == 102 and message_type == "train":
            content["info"]["org"] = "org-1"
            content["metrics"] = MetricRecord({"score": 0.99, "val_score": 0.99})
            cfg = t.last_config
            signed = sign_reply(content, ids[2], cfg["run_key"], cfg["round"], message_type, node)
            signed[SIG_RECORD]["name"] = "org-1"
            return signed
        return content

    t.tamper, t.tamper_gets_type = impersonate, True
    _remember_config(t)
    c = run(tmp_path, t, rounds=2)
    for r in c.log.rounds:
        assert set(r["rejected"]) == {"node 102"}
        assert "does not verify" in r["rejected"]["node 102"]
    # org-1's metrics are its own, never the impersonator's 0.99
    assert all(m.get("score") != 0.99 for r in c.log.rounds for m in r["metrics"].values())


def test_a_reply_relayed_from_another_node_is_refused_and_nobody_counts_twice(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1), t)
    contents = {n: c.train_message(n, 1) for n in sorted(t.orgs)}
    replies = {n: handle_content(t.orgs[n], contents[n], "train", n) for n in sorted(t.orgs)}
    entry = c.log.new_round(1)
    from fedembed.coordinator import Reply

    c._round_names = {}
    assert c._read_reply(Reply(100, replies[100]), entry, 1, "train", 0)[0] == "org-0"
    # node 102 relays org-0's signed reply as its own: bound to node 100, refused
    assert c._read_reply(Reply(102, _copy(replies[100])), entry, 1, "train", 0)[0] is None
    assert "does not verify" in entry["rejected"]["node 102"] and "node 100" not in str(entry["rejected"])
    # the same org answering again from a second node (its key copied there) is counted once
    t2 = direct_transport(tmp_path / "twin", 3, task=TASK)
    twin = handle_content(t2.orgs[100], c.train_message(103, 1), "train", 103)
    signed = sign_reply(twin, t.identities[0], c.cfg.run_key(), 1, "train", 103)
    assert c._read_reply(Reply(103, signed), entry, 1, "train", 0)[0] is None
    assert "already answered this round from node 100" in entry["rejected"]["node 103"]


def test_a_replayed_reply_of_an_earlier_round_is_refused(tmp_path, direct_transport):
    kept = {}

    def replay(node, content, message_type):
        if node == 101 and message_type == "train":
            round_ = int(t.last_config["round"])
            if round_ == 1:
                kept["r1"] = _copy(content)
            elif "r1" in kept:
                return _copy(kept["r1"])  # the signed round-1 reply, unchanged
        return content

    t = direct_transport(tmp_path, 3, task=TASK, resign=False)
    t.tamper, t.tamper_gets_type = replay, True
    _remember_config(t)
    c = run(tmp_path, t, rounds=3)
    assert "node 101" not in c.log.rounds[0]["rejected"]
    for r in c.log.rounds[1:]:
        assert "round 2" in r["rejected"]["node 101"] or "round 3" in r["rejected"]["node 101"]
        assert r["clients"] == 2


def test_a_reply_signed_for_another_run_is_refused(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1), t)
    msg = c.train_message(100, 1)
    other = run_config(TASK, rounds=1, seed=5)
    reply = handle_content(t.orgs[100], msg, "train", 100)
    resigned = sign_reply(reply, t.identities[0], other.run_key(), 1, "train", 100)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_reply(resigned, t.roster, c.cfg.run_key(), 1, "train", 100)


def test_unsigned_or_unknown_signer_replies_are_refused(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1), t)
    reply = handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)
    unsigned = _copy(reply)
    del unsigned[SIG_RECORD]
    with pytest.raises(IdentityError, match="not signed"):
        verify_reply(unsigned, t.roster, c.cfg.run_key(), 1, "train", 100)
    stranger_roster = make_identities(["org-9"], tmp_path / "stranger")
    outsider = _copy(reply)
    outsider[SIG_RECORD]["name"] = "org-9"
    with pytest.raises(IdentityError, match="not in the roster"):
        verify_reply(outsider, t.roster, c.cfg.run_key(), 1, "train", 100)
    assert "org-9" in stranger_roster.names


def test_a_newline_in_a_claimed_name_cannot_forge_a_log_line(tmp_path, direct_transport, caplog):
    def forge(node, content):
        if node == 101:
            content["info"]["org"] = "org-1\nWARNING round 1: org-0 refused: forged"
            content["metrics"] = MetricRecord({"score\nforged": float("nan")})
        return content

    with caplog.at_level(logging.WARNING):
        c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK, tamper=forge), rounds=1)
    assert "org-0" not in c.log.rounds[0]["rejected"]
    assert all("\n" not in rec.getMessage() for rec in caplog.records if rec.name == "fedembed.coordinator")
    with pytest.raises(IdentityError, match="organisation name"):  # a roster name cannot carry one either
        Roster.from_dict({"evil\nname": c.roster.to_dict()["org-0"]})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metrics_are_refused_and_metrics_json_stays_valid(tmp_path, direct_transport, value):
    def bad_metric(node, content):
        if node == 101 and "metrics" in content:
            content["metrics"]["val_score"] = value
        return content

    c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK, tamper=bad_metric), rounds=2)
    assert all("not a finite number" in r["rejected"]["org-1"] for r in c.log.rounds[1:])
    c.log.write(tmp_path / "out", c.tables.tables)
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=lambda x: pytest.fail(x))
    assert np.isfinite(doc["final"]["mean"]["score"])


def test_an_ok_train_reply_without_its_update_is_refused_and_logged(tmp_path, direct_transport, caplog):
    def drop_update(node, content):
        if node == 101 and "update" in content:
            del content["update"]
        return content

    with caplog.at_level(logging.WARNING):
        c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK, tamper=drop_update), rounds=1)
    assert "status ok but no update" in c.log.rounds[0]["rejected"]["org-1"]
    assert any("org-1 refused: status ok but no update" in rec.getMessage() for rec in caplog.records)


def test_records_outside_the_schema_are_refused(tmp_path, direct_transport):
    def extra(node, content):
        if node == 101:
            content["backdoor"] = ConfigRecord({"x": 1})
            content["more"] = ArrayRecord({"a": Array(np.zeros(3))})
        return content

    c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK, tamper=extra), rounds=1)
    assert "records outside the reply schema: ['backdoor', 'more']" in c.log.rounds[0]["rejected"]["org-1"]


def test_content_altered_after_signing_is_refused(tmp_path, direct_transport):
    """Someone between the org and the coordinator changes a delta: the digest no longer matches."""

    def alter(node, content):
        if node == 101 and "update" in content:
            d = content["update"]["products.delta"].numpy().copy()
            d[0, 0] += 1
            content["update"]["products.delta"] = Array(d)
        return content

    c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK, tamper=alter, resign=False), rounds=1)
    assert "does not verify" in c.log.rounds[0]["rejected"]["node 101"]


def _copy(content):
    """A new RecordDict holding the same records (records are not changed in place here)."""
    from flwr.app import RecordDict

    return RecordDict(dict(content.items()))


def _remember_config(t):
    """Let a tamper function see the config of the message being answered."""
    orig = t.exchange_iter

    def exchange_iter(message_type, contents, timeout):
        for node, content in contents.items():
            t.last_config = dict(content["config"])
            yield from orig(message_type, {node: content}, timeout)

    t.exchange_iter = exchange_iter


def _past_round_two(tmp_path, direct_transport):
    """A 3-round run after its round 2, with org-0's (node 100's) round-1 train message kept to be sent again."""
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=3), t)
    nodes = sorted(t.orgs)
    old = c.train_message(100, 1)
    c.run_round(1, nodes)
    c.run_round(2, nodes)
    return t, c, nodes, old


def test_an_old_rounds_train_message_sent_again_is_refused_and_rewinds_nothing(tmp_path, direct_transport):
    """A coordinator that sends round 1's train message again after round 2: the organisation trained for
    round 1 already (a second answer would train its head twice on one round and, with its stale sync, rewind
    its table cache to version 0). Refused, signed, before the sync is applied; the run goes on unharmed."""
    t, c, nodes, old = _past_round_two(tmp_path, direct_transport)
    for msg in (old, c.train_message(100, 2)):
        reply = handle_content(t.orgs[100], msg, "train", 100)
        assert reply["info"]["status"] == "refused" and "was already answered" in reply["info"]["error"]
        assert "update" not in reply
    third = c.run_round(3, nodes)
    assert third["clients"] == 3 and "org-0" not in third["rejected"]  # its cache was not rewound: not stale


@pytest.mark.parametrize("damage", [b"{", b'{"run_key": "k", "round": "2"}', b"[]"])
def test_a_damaged_record_of_the_rounds_answered_refuses_training_instead_of_forgetting_them(tmp_path, direct_transport,
                                                                                           damage):
    """The record that stops a round being answered twice is damaged (a disk fault, a careless edit): taking it
    for 'nothing answered yet' would let a coordinator replay round 1. The organisation refuses every train
    message, naming the file, and leaves it as it is; once it is restored the run goes on."""
    t, c, nodes, old = _past_round_two(tmp_path, direct_transport)
    record = t.orgs[100].state.dir / "answered.json"
    good = record.read_bytes()
    record.write_bytes(damage)
    for msg in (old, c.train_message(100, 3)):
        reply = handle_content(t.orgs[100], msg, "train", 100)
        assert reply["info"]["status"] == "refused" and "answered.json" in reply["info"]["error"]
        assert "is damaged" in reply["info"]["error"] and "update" not in reply
    assert record.read_bytes() == damage
    record.write_bytes(good)
    third = c.run_round(3, nodes)
    assert third["clients"] == 3 and "org-0" not in third["rejected"]


# ------------------------------------------------------------------ metrics asked for again and again
def test_an_organisation_reports_its_metrics_once_per_round_of_a_run(tmp_path, direct_transport):
    """Evaluate messages of any round, as many as the coordinator liked, each with tables of its choosing, made the
    exact metrics an oracle on held-out labels (one row set apart per message: the labels of the test examples
    holding it; 281 of 281 rows recovered in 296 messages). Now metrics leave once per round of a run, in
    increasing rounds, whichever message asks; a message of another run in between does not reopen a round."""
    t = direct_transport(tmp_path, 2, task=TASK)
    c = Coordinator(run_config(TASK, rounds=3), t)
    c.run_round(1, sorted(t.orgs))
    first = handle_content(t.orgs[100], c._message(100, 2, True), "evaluate", 100)
    assert first["info"]["status"] == "ok" and "metrics" in first  # round 2's evaluation: once
    again = handle_content(t.orgs[100], c._message(100, 2, True), "evaluate", 100)
    assert again["info"]["status"] == "refused" and "reported its metrics for round 2" in again["info"]["error"]
    earlier = handle_content(t.orgs[100], c._message(100, 1, True), "evaluate", 100)
    assert earlier["info"]["status"] == "refused" and "metrics" not in earlier
    other = Coordinator(run_config(TASK, rounds=3, seed=7), t)  # another run, then this one again
    assert other.cfg.run_key() != c.cfg.run_key()
    assert handle_content(t.orgs[100], other._message(100, 1, True), "evaluate", 100)["info"]["status"] == "ok"
    assert handle_content(t.orgs[100], c._message(100, 2, True), "evaluate", 100)["info"]["status"] == "refused"


def test_an_organisation_answers_at_most_max_runs_runs(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    t.orgs[100].max_runs = 1
    first = Coordinator(run_config(TASK, rounds=1), t)
    assert handle_content(t.orgs[100], first.train_message(100, 1), "train", 100)["info"]["status"] == "ok"
    second = Coordinator(run_config(TASK, rounds=1, seed=7), t)
    reply = handle_content(t.orgs[100], second.train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "refused" and "at most 1 run(s) (max-runs)" in reply["info"]["error"]
    assert handle_content(t.orgs[100], first._message(100, 2, True), "evaluate", 100)["info"]["status"] == "ok"


@pytest.mark.parametrize(("recipe", "field"), [({"epochs": 200}, "epochs 200"), ({"head_epochs": 50.0}, "head_epochs 50"),
                                               ({"cooc_negatives": 20000}, "cooc_negatives 20000"),
                                               ({"batch_size": 10 ** 7}, "batch_size 1e+07")])
def test_a_recipe_asking_more_work_than_the_organisation_allows_is_refused_before_training(tmp_path, direct_transport,
                                                                                           recipe, field):
    """The recipe was bounded from below only: epochs 200 kept one message's worker busy 16 s on a 3,000-row toy
    task, cooc_negatives 20,000 asked for a 1.7 GiB array, and a message refused after such a failure can come again."""
    from fedembed.recipe import TrainConfig

    t = direct_transport(tmp_path, 2, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**recipe)), t)
    reply = handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "refused" and f"the recipe's {field} is above this organisation's limit" in (
        reply["info"]["error"])
    assert t.orgs[100].state.load_head() is None


def test_control_an_organisation_with_higher_limits_takes_the_same_recipe(tmp_path, direct_transport):
    from fedembed.recipe import TrainConfig, WorkLimits

    t = direct_transport(tmp_path, 2, task=TASK)
    t.orgs[100].limits = WorkLimits(max_epochs=20)
    c = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(epochs=12)), t)
    assert handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)["info"]["status"] == "ok"
