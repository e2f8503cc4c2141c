"""Working-set sync (issue 14): an organisation downloads only the rows its data looks up, never uses a stale one."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from conftest import DirectTransport, run_config
from fedembed.coordinator import Coordinator
from fedembed.org import handle_content
from fedembed.tables import RowRequest, RowSync, VersionedTables
from fedembed.task import TaskSpec, load_task
from fedembed.wire import decode_request, decode_sync, encode_request, encode_sync
from fedembed.sparse import UpdateError
from fedembed.workingset import (
    RowState, StaleRowError, SyncPolicy, SyncRefused, lookup_guard, working_set,
)

TASK = TaskSpec("synthetic", {"orgs": 3, "rows": 3000, "touch": 0.02, "examples": 300, "dim": 8, "hidden": 8})
# each organisation's held-out data looks up rows its training data never does (about 90 of 400)
HELD = TaskSpec("synthetic", {"orgs": 3, "rows": 3000, "touch": 0.1, "examples": 200, "dim": 8, "hidden": 8})
CLICKS = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 4000})


def _orgs_with(transport: DirectTransport, mode: str) -> DirectTransport:
    for org in transport.orgs.values():
        org.sync = SyncPolicy(mode)
    return transport


def _cache(org, c):
    tables, version = org.state.load_tables(c.shapes, c.cfg.seed, c.cfg.table_scale, c.cfg.run_key())
    return tables, version, RowState.load(org.state.dir, c.shapes, version, c.cfg.run_key())


def test_policy_defaults_keep_each_modes_promise():
    auto = SyncPolicy()
    assert auto.resolve(secure=False, row_set="union") == "padded"  # plain: uploads show its training rows anyway
    assert auto.resolve(secure=True, row_set="revealed") == "padded"
    assert auto.resolve(secure=True, row_set="union") == "full"
    assert auto.resolve(secure=True, row_set="dense") == "full"
    assert SyncPolicy("padded").resolve(True, "union") == "padded"  # an organisation's explicit choice wins
    assert SyncPolicy("working-set").resolve(False, "union") == "working-set"
    assert SyncPolicy.from_node_config({"sync": "full", "sync-pad": "8"}) == SyncPolicy("full", 8.0)
    with pytest.raises(ValueError):
        SyncPolicy("everything")


@pytest.mark.parametrize("task", [TASK, CLICKS, HELD], ids=["task-hook", "derived-by-lookups", "held-out-only-rows"])
def test_working_set_cache_equals_the_coordinators_tables_after_every_round(tmp_path, task):
    t = DirectTransport(tmp_path, 3, task=task)
    c = Coordinator(run_config(task, rounds=4), t)
    for round_ in range(1, 5):
        before = {n: a.copy() for n, a in c.tables.tables.items()}  # the version this round's sync brings
        entry = c.run_round(round_, sorted(t.orgs))
        assert entry["rejected"] == {} and entry["clients"] == 3
        for node, org in t.orgs.items():
            tables, version, rows = _cache(org, c)
            assert version == round_ - 1 and rows.version == version
            ws = working_set(org.task, c.shapes)
            for name in c.shapes:
                assert rows.stale({name: ws[name]}) == {}  # every row it looks up is fresh
                fresh = rows.fresh_mask(name)
                assert np.array_equal(tables[name][fresh], before[name][fresh])  # and fresh means current
            assert all(req.ids.size < c.shapes[n][0] for n, req in c.wants[node][0].items())  # a part of the table
    c.closing_evaluation(sorted(t.orgs))
    for org in t.orgs.values():
        tables, version, rows = _cache(org, c)
        assert version == 4
        for name, ids in working_set(org.task, c.shapes).items():
            assert np.array_equal(tables[name][ids], c.tables.tables[name][ids])


def test_sync_carries_only_working_set_rows_that_changed_plus_new_ones():
    vt = VersionedTables.initial({"t": (10, 2)}, 0, 0.1)
    vt.stamp("t", np.array([1, 2, 7]), 1)
    vt.stamp("t", np.array([2, 8]), 2)
    req = {"t": RowRequest(np.array([1, 2, 3, 8, 9]), np.array([1, 9]))}
    got = vt.rows_requested(req, since=1)["t"]
    assert got.ids.tolist() == [1, 2, 8]  # 2 and 8 changed after 1; 1 is new to the set (stamp 1 > 0); 9 is seeded
    assert got.stamps.tolist() == [1, 2, 2]
    assert vt.rows_since(1)["t"].ids.tolist() == [2, 8]


@pytest.mark.parametrize("task", [pytest.param(TASK, marks=pytest.mark.slow), HELD],
                         ids=["no-held-out-only-rows", "held-out-only-rows"])
def test_working_set_sync_gives_bit_identical_tables_and_metrics_to_full_sync(tmp_path, task):
    logs, tables, down = {}, {}, {}
    for mode in ("full", "working-set", "auto"):  # auto: padded here, the default of plain rounds
        t = _orgs_with(DirectTransport(tmp_path / mode, 3, task=task), mode)
        c = Coordinator(run_config(task, rounds=3), t)
        c.run()
        assert all(r["rejected"] == {} and r["clients"] == 3 for r in c.log.rounds)  # nobody sat a round out stale
        assert c.log.extra["closing_evaluation"]["rejected"] == {}
        logs[mode], tables[mode] = c.log, c.tables.tables
        down[mode] = sum(r["download_bytes"] for r in c.log.rounds[1:])
    for mode in ("working-set", "auto"):
        assert np.array_equal(tables["full"]["ids"], tables[mode]["ids"])
        assert logs["full"].final() == logs[mode].final()
        assert [r["metrics"] for r in logs["full"].rounds] == [r["metrics"] for r in logs[mode].rounds]
    # here 3 organisations: each gets its own part of the changed rows (with its cover's under auto)
    assert down["working-set"] <= down["auto"] < down["full"]


def test_a_row_outside_the_working_set_is_never_looked_up_stale():
    task = load_task(TASK.for_org(0, 3))
    model = task.build_model()
    state = RowState.fresh_start(model.table_shapes(), 0)
    state.version = 2  # rows known current at version 0 only: all stale at 2
    ws = working_set(task, model.table_shapes())["ids"]
    state.seen["ids"][ws] = 2
    batch = next(task.batches("train", 8, None))
    with lookup_guard(model, state):
        task.loss(model, batch)  # its own rows: fine
        outside = np.setdiff1d(np.arange(3000), ws)[:3]
        with pytest.raises(StaleRowError) as exc:
            model(__import__("torch").from_numpy(outside), __import__("torch").tensor([0]))
    assert exc.value.rows["ids"].tolist() == outside.tolist()


@pytest.mark.parametrize("mode", ["auto", "working-set"])
def test_a_lookup_outside_the_declared_working_set_is_fetched_next_round_not_used(tmp_path, monkeypatch, mode):
    t = _orgs_with(DirectTransport(tmp_path, 3, task=HELD), mode)
    c = Coordinator(run_config(HELD, rounds=4), t)
    org = t.orgs[100]
    train_rows = np.unique(org.task._split("train").ids).astype(np.int64)
    real = type(org.task).working_set
    # organisation 0 forgets to declare the rows only its held-out data looks up
    monkeypatch.setattr(type(org.task), "working_set", lambda self: {"ids": train_rows} if self is org.task else real(self))
    held_out = np.setdiff1d(real(org.task)["ids"], train_rows)
    assert held_out.size
    assert c.run_round(1, sorted(t.orgs))["rejected"] == {}  # version 0: every row is the seeded one, fresh
    assert not np.isin(held_out, c.wants[100][0]["ids"].ids).all()
    entry = c.run_round(2, sorted(t.orgs))  # its evaluation looks up held-out rows it never asked for: not used stale
    assert "stale" in entry["rejected"]["org-0"] and entry["clients"] == 2
    looked_up = _cache(org, c)[2].extra["ids"]
    assert np.array_equal(looked_up, held_out)  # one pass found every one of them, not just the first
    assert np.isin(looked_up, c.wants[100][0]["ids"].ids).all()  # asked for with its reply
    current = c.tables.tables["ids"].copy()  # the version round 3 syncs
    entry = c.run_round(3, sorted(t.orgs))  # the rows it looked up were fetched: it trains again
    assert entry["rejected"] == {} and entry["clients"] == 3
    tables, version, rows = _cache(org, c)
    assert rows.stale({"ids": rows.extra["ids"]}) == {}
    assert np.array_equal(tables["ids"][held_out], current[held_out])  # and were current when it evaluated on them


# ---------------------------------------------------------------- a hostile organisation


def _want(kind):
    def tamper(node, content):
        if node != 101 or "want" not in content:
            return content
        ids = content["want"]["ids.ids"].numpy()
        if kind == "range":
            ids = ids.copy(); ids[-1] = 10**6
        elif kind == "unsorted":
            ids = ids[::-1].copy()
        elif kind == "huge":
            ids = np.arange(3001, dtype=np.int32)
        elif kind == "new-outside":
            content["want"]["ids.new"] = Array(np.array([ids[0] + 1 if ids[1] != ids[0] + 1 else ids[-1] + 1], np.int32))
        elif kind == "garbage":
            content["want"]["ids.new"] = Array(dtype="int32", shape=(3,), stype="numpy.ndarray", data=b"\x00" * 5)
            return content
        elif kind == "unknown-table":
            content["want"]["other.ids"] = Array(np.array([1], np.int32))
            return content
        content["want"]["ids.ids"] = Array(ids.astype(np.int32))
        return content
    return tamper


@pytest.mark.parametrize("kind, fault", [("range", "out of range"), ("unsorted", "sorted"), ("huge", "names 3001 rows"),
                                         ("new-outside", "new rows outside"), ("garbage", "cannot be decoded"),
                                         ("unknown-table", "unexpected arrays")])
def test_a_bad_working_set_request_is_refused_naming_the_org_and_the_round_goes_on(tmp_path, kind, fault, caplog):
    t = DirectTransport(tmp_path, 3, task=TASK, tamper=_want(kind))
    c = Coordinator(run_config(TASK, rounds=2), t)
    entry = c.run_round(1, sorted(t.orgs))
    assert list(entry["rejected"]) == ["org-1"] and fault in entry["rejected"]["org-1"]
    assert entry["clients"] == 2 and 101 not in c.wants
    assert any("org-1" in r.message and fault in r.message for r in caplog.records)
    entry = c.run_round(2, sorted(t.orgs))  # nothing crashed; the others go on
    assert entry["clients"] == 2


def test_request_decoding_refuses_what_it_cannot_trust():
    shapes = {"t": (100, 4)}
    ok = encode_request({"t": RowRequest(np.array([1, 5, 9]), np.array([5]))}, shapes)
    assert decode_request(ok, shapes)["t"].ids.tolist() == [1, 5, 9]
    with pytest.raises(UpdateError, match="every shared table"):
        decode_request(encode_request({}, shapes), shapes)
    with pytest.raises(UpdateError, match="out of range"):
        decode_request(encode_request({"t": RowRequest(np.array([-1, 5]), np.array([], int))}, shapes), shapes)
    with pytest.raises(UpdateError, match="1-d integer"):
        bad = encode_request({"t": RowRequest(np.array([1]), np.array([], int))}, shapes)
        bad["t.ids"] = Array(np.array([1.5], np.float32))
        decode_request(bad, shapes)


# ---------------------------------------------------------------- a hostile coordinator


def _after_two_rounds(tmp_path):
    t = DirectTransport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=3), t)
    c.run_round(1, sorted(t.orgs))
    c.run_round(2, sorted(t.orgs))
    return t, c


def _answer(t, c, node, edit):
    content = c.train_message(node, 3)
    sync = decode_sync(content["sync"], c.shapes)
    edit(sync["ids"], c, t)
    content["sync"] = encode_sync(sync, c.shapes)
    out = handle_content(t.orgs[node], content, "train", node)
    return out["info"]


def _outside(rs, c, t):
    ws = c.wants[100][0]["ids"].ids
    extra = np.setdiff1d(np.arange(3000), ws)[:2]
    order = np.argsort(np.r_[rs.ids, extra])
    rs.ids = np.r_[rs.ids, extra][order]
    rs.values = np.r_[rs.values, c.tables.tables["ids"][extra]][order]
    rs.stamps = np.r_[rs.stamps, [2, 2]][order]


def _future(rs, c, t):
    rs.stamps = rs.stamps.copy(); rs.stamps[0] = 7


def _omit_own(rs, c, t):  # drop a row organisation 0 itself changed in round 2
    state = RowState.load(t.orgs[100].state.dir, c.shapes, 1, c.cfg.run_key())
    assert state.uploaded_round == 2
    keep = rs.ids != state.uploaded["ids"][0]
    rs.ids, rs.values, rs.stamps = rs.ids[keep], rs.values[keep], rs.stamps[keep]


@pytest.mark.parametrize("edit, fault", [
    (_outside, "outside the working set"),
    (_future, "stamps outside"),
    (_omit_own, "omitted changed rows"),
])
def test_a_coordinator_that_breaks_the_requested_sync_gets_a_signed_refusal(tmp_path, edit, fault):
    t, c = _after_two_rounds(tmp_path)
    before = _cache(t.orgs[100], c)
    info = _answer(t, c, 100, edit)
    assert info["status"] == "refused" and fault in info["error"]
    after = _cache(t.orgs[100], c)  # nothing of the bad sync was applied
    assert after[1] == before[1] and np.array_equal(after[0]["ids"], before[0]["ids"])


def test_a_row_rolled_back_to_an_older_version_is_refused(tmp_path):
    t, c = _after_two_rounds(tmp_path)
    state = RowState.load(t.orgs[100].state.dir, c.shapes, 1, c.cfg.run_key())
    held = np.flatnonzero(state.stamps["ids"] == 1)[:1]
    assert held.size
    sync = {"ids": RowSync(held, c.tables.tables["ids"][held], np.array([1]))}
    state.stamps["ids"][held] = 2  # as if it held that row at stamp 2 already
    with pytest.raises(SyncRefused, match="rolled back"):
        state.apply(sync, "requested", 1, 2)


def test_a_secure_union_organisation_sends_no_working_set_by_default(tmp_path):
    t = DirectTransport(tmp_path, 3, task=TASK)
    org = t.orgs[100]
    assert org.sync.resolve(True, "union") == "full"
    c = Coordinator(run_config(TASK, rounds=1, secure=True, row_set="union"), t)
    content = c.train_message(100, 1)
    out = handle_content(org, content, "train", 100)
    assert "want" not in out and out["info"]["status"] == "ok"


def test_an_unchanged_request_travels_as_its_digest_and_a_foreign_digest_is_refused(tmp_path):
    def forge(node, content):
        if node == 101 and "want" in content and "digest" in content["want"].keys():
            content["want"]["digest"] = Array(np.frombuffer(b"\x01" * 32, dtype=np.uint8).copy())
        return content

    t = DirectTransport(tmp_path, 3, task=TASK, tamper=forge)
    c = Coordinator(run_config(TASK, rounds=3), t)
    for r in (1, 2, 3):
        c.run_round(r, sorted(t.orgs))
    wants = [(n, out["want"]) for n, typ, out in t.seen if typ == "train" and not isinstance(out, Exception)]
    assert all("ids.ids" in w.keys() for _, w in wants[:3])  # round 1: the whole request
    assert all(list(w.keys()) == ["digest"] for n, w in wants[3:6] if n != 101)  # unchanged since: 32 bytes
    assert "not the digest of the request held" in c.log.rounds[1]["rejected"]["org-1"]  # named, the round goes on
    assert c.log.rounds[1]["clients"] == 2


def test_plain_and_secure_runs_stay_bit_identical_with_each_modes_default_sync(tmp_path):
    tables, wants = {}, {}
    for name, kw in (("plain", {}), ("revealed", {"secure": True, "row_set": "revealed"}),
                     ("union", {"secure": True, "row_set": "union"})):
        t = DirectTransport(tmp_path / name, 3, task=TASK)
        c = Coordinator(run_config(TASK, rounds=3, **kw), t)
        c.run()
        assert all(r["rejected"] == {} and r["clients"] == 3 for r in c.log.rounds)
        tables[name] = c.tables.tables["ids"]
        wants[name] = any("want" in out.keys() for _, typ, out in t.seen if typ == "train" and not isinstance(out, Exception))
    assert np.array_equal(tables["plain"], tables["revealed"]) and np.array_equal(tables["plain"], tables["union"])
    assert wants == {"plain": True, "revealed": True, "union": False}  # union keeps the full sync: nothing revealed


def test_per_request_sync_records_are_bounded_and_past_the_bound_the_full_sync_is_sent(tmp_path, monkeypatch):
    import fedembed.coordinator as coordinator

    t = DirectTransport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=3), t)
    c.run_round(1, sorted(t.orgs))
    c.run_round(2, sorted(t.orgs))
    monkeypatch.setattr(coordinator, "REQUEST_RECORD_TABLES", 1e-9)  # no room for any per-request record
    content = c.train_message(100, 3)
    assert content["config"]["request"] == ""  # the full sync: always accepted, reveals nothing
    assert decode_sync(content["sync"], c.shapes)["ids"].ids.tolist() == c.tables.rows_since(c.known[100])["ids"].ids.tolist()
    entry = c.run_round(3, sorted(t.orgs))
    assert entry["rejected"] == {} and entry["clients"] == 3
