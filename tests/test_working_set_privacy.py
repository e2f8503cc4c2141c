"""What a coordinator learns from working-set requests (issue 14): play it, record everything, and see what it can tell.

The coordinator is the attacker here: it keeps every request (``want``) and every row id an
organisation's uploads show (plain update ids, secure ``revealed`` row sets), round after
round, and derives from them every set it can by set algebra: the rows asked for beyond
what the uploads showed, their intersection over rounds, what enters and what leaves the
request from one round to the next, the rows marked ``new``. Under the default policy no
such set may single out a row that only the organisation's held-out data looks up: in each
one, at most ``1 / pad`` of the rows are such rows. Against ``--sync working-set`` the very
same attacker recovers those rows exactly (the control: the attacker has teeth).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DirectTransport, run_config
from fedembed.coordinator import Coordinator
from fedembed.recipe import TrainConfig
from fedembed.task import TaskSpec
from fedembed.wire import decode_update
from fedembed.workingset import (
    RequestCover, RowState, SyncPolicy, cover_layer, decoy_key, decoy_order, working_set,
)

# each organisation's held-out data looks up rows its training data never does (about 90 of 400)
HELD = TaskSpec("synthetic", {"orgs": 3, "rows": 3000, "touch": 0.1, "examples": 200, "dim": 8, "hidden": 8})
PAD = 4.0


def _held_out_only(org) -> np.ndarray:
    """Ground truth the coordinator must not learn: rows only the organisation's held-out data looks up."""
    ws = working_set(org.task, {"ids": (3000, 8)})["ids"]
    return np.setdiff1d(ws, np.unique(org.task._split("train").ids))


class Spy:
    """The coordinator's view of one run: per round and node, the request it holds and the row ids uploads showed."""

    def __init__(self, t: DirectTransport, c: Coordinator) -> None:
        self.t, self.c, self.cursor = t, c, 0
        self.requests: dict[int, list[np.ndarray]] = {n: [] for n in t.orgs}
        self.news: dict[int, list[np.ndarray]] = {n: [] for n in t.orgs}
        self.shown: dict[int, list[np.ndarray]] = {n: [] for n in t.orgs}

    def round(self, r: int) -> dict:
        entry = self.c.run_round(r, sorted(self.t.orgs))
        uploads = {n: np.zeros(0, np.int64) for n in self.t.orgs}
        for node, typ, out in self.t.seen[self.cursor:]:
            if typ != "train" or isinstance(out, Exception):
                continue
            if "update" in out:
                uploads[node] = np.union1d(uploads[node], decode_update(out["update"], self.c.shapes)["ids"].ids)
            if "rows" in out:  # secure revealed: the row set, never the values
                uploads[node] = np.union1d(uploads[node], out["rows"]["ids"].numpy().astype(np.int64))
        self.cursor = len(self.t.seen)
        for node in self.t.orgs:
            before = self.shown[node][-1] if self.shown[node] else np.zeros(0, np.int64)
            self.shown[node].append(np.union1d(before, uploads[node]))
            req = self.c.wants[node][0]["ids"]
            self.requests[node].append(req.ids.astype(np.int64))
            self.news[node].append(req.new.astype(np.int64))
        return entry

    def derived(self, node: int) -> list[tuple[str, np.ndarray]]:
        """Every set the coordinator derives about ``node``'s rows beyond its uploads."""
        reqs, shown, news = self.requests[node], self.shown[node], self.news[node]
        beyond = [np.setdiff1d(r, s) for r, s in zip(reqs, shown)]
        out = [(f"asked beyond uploads, round {i + 1}", b) for i, b in enumerate(beyond)]
        out.append(("asked beyond uploads in every round", _intersect(beyond)))
        for i in range(1, len(reqs)):
            out.append((f"entered the request in round {i + 1}", np.setdiff1d(reqs[i], reqs[i - 1])))
            out.append((f"left the request in round {i + 1}", np.setdiff1d(reqs[i - 1], reqs[i])))
            out.append((f"entered beyond uploads in round {i + 1}", np.setdiff1d(beyond[i], beyond[i - 1])))
        out += [(f"marked new in round {i + 1}", np.setdiff1d(n, shown[i])) for i, n in enumerate(news)]
        return [(what, s) for what, s in out if s.size]


def _intersect(sets: list[np.ndarray]) -> np.ndarray:
    out = sets[0]
    for s in sets[1:]:
        out = np.intersect1d(out, s)
    return out


def _run(tmp_path, mode: str, rounds: int, change=None, **kw) -> tuple[Spy, DirectTransport]:
    t = DirectTransport(tmp_path, 3, task=HELD)
    for org in t.orgs.values():
        org.sync = SyncPolicy(mode, PAD)
    c = Coordinator(run_config(HELD, rounds=rounds, **kw), t)
    spy = Spy(t, c)
    for r in range(1, rounds + 1):
        if change is not None:
            change(r, t)
        entry = spy.round(r)
        assert entry["clients"] == 3 or "stale" in str(entry["rejected"]), entry["rejected"]
    return spy, t


@pytest.mark.parametrize("kw", [{}, pytest.param({"secure": True, "row_set": "revealed"}, marks=pytest.mark.slow)],
                         ids=["plain", "revealed"])
def test_the_coordinator_cannot_single_out_a_held_out_only_row_from_the_requests_of_a_run(tmp_path, kw):
    spy, t = _run(tmp_path, "auto", 4, **kw)
    for node, org in t.orgs.items():
        secret = _held_out_only(org)
        assert secret.size > 50
        final = spy.requests[node][-1]
        assert np.isin(working_set(org.task, spy.c.shapes)["ids"], final).all()  # every row it uses is kept fresh
        assert not np.isin(secret, spy.shown[node][-1]).any()  # its uploads never show them
        for what, rows in spy.derived(node):
            share = np.isin(rows, secret).mean()
            assert share <= 1 / PAD, f"{org.identity.name}: {what}: {share:.2f} of {rows.size} rows are held-out-only"
        # beyond the rows its uploads show, the request is one cover, asked for unchanged every round
        assert all(np.array_equal(r, final) for r in spy.requests[node][1:])


@pytest.mark.slow
def test_under_dp_the_request_shows_only_the_rows_dp_released_and_covers_the_rest(tmp_path):
    dp = TrainConfig(dp_noise_multiplier=1.0, dp_clip=1.0, dp_selection_noise_multiplier=0.5, dp_row_threshold=5.0,
                     dp_count_clip=3.0, keep_table_state=False, batch_size=16, max_row_weight=3)
    spy, t = _run(tmp_path, "auto", 3, train=dp)
    for node, org in t.orgs.items():
        train_rows = np.unique(org.task._split("train").ids)
        released = spy.shown[node][-1]
        withheld = np.setdiff1d(train_rows, released)  # rows it trained on that DP never let its uploads show
        assert withheld.size > 0 and np.setdiff1d(released, train_rows).size > 0  # and pure-noise rows it did release
        used = working_set(org.task, spy.c.shapes)["ids"]
        assert np.isin(used, spy.requests[node][-1]).all()
        # Later uploads release some cover rows, and a cover row released leaves every set beyond the uploads. DP
        # releases the rows no training example touched all alike (``fedembed.dp.selection``), held-out-only rows
        # and decoys at the same rate, so each remaining row is still its own with probability at most 1 / PAD;
        # but the share in one run moves by chance, by about sqrt(m p (1 - p)) rows where m cover rows were
        # released (a released decoy raises it, a released training row lowers it). Four such deviations allowed.
        cover = np.setdiff1d(spy.requests[node][0], spy.shown[node][0])
        m = np.intersect1d(cover, released).size
        chance = 4 * np.sqrt(m * (1 / PAD) * (1 - 1 / PAD))
        for what, rows in spy.derived(node):  # nothing beyond the released rows tells which rows it really uses
            own = np.isin(rows, used).sum()
            assert own <= rows.size / PAD + chance, f"{org.identity.name}: {what}: {own} of {rows.size} its own ({m} released)"


def test_the_same_coordinator_recovers_every_held_out_only_row_under_sync_working_set(tmp_path):
    spy, t = _run(tmp_path, "working-set", 2)
    for node, org in t.orgs.items():
        beyond = dict(spy.derived(node))["asked beyond uploads, round 2"]
        assert np.array_equal(beyond, _held_out_only(org))  # what the default hides, this policy gives away


def test_held_out_data_that_changes_enters_the_request_under_a_cover_and_nothing_ever_leaves(tmp_path, monkeypatch):
    added = np.arange(2900, 2940)  # rows its new held-out data will look up (no organisation uses them yet)
    state = {}

    def change(r, t):
        org = t.orgs[100]
        cls = type(org.task)
        if "ws" not in state:
            state["ws"], state["orig"] = org.task.working_set()["ids"], cls.working_set
        base = state["ws"]
        if r == 3:  # new held-out data: 40 new rows
            rows = np.union1d(base, added)
        elif r >= 4:  # and then a part of its held-out data is deleted
            rows = np.setdiff1d(np.union1d(base, added), np.r_[_held_out_only(org)[:20], added[:10]])
        else:
            return
        orig = state["orig"]
        monkeypatch.setattr(cls, "working_set", lambda self: {"ids": rows} if self is org.task else orig(self))

    spy, t = _run(tmp_path, "auto", 5, change=change)
    reqs = spy.requests[100]
    assert not np.isin(added, reqs[1]).all() and np.isin(added, reqs[2]).all()  # asked for from round 3 on
    entered = np.setdiff1d(reqs[2], reqs[1])
    assert entered.size == int(np.ceil(PAD * np.setdiff1d(added, reqs[1]).size))  # among decoys: one layer
    assert np.isin(entered, added).mean() <= 1 / PAD  # a row that enters is one of its own with chance <= 1/pad
    assert all(np.isin(reqs[i - 1], reqs[i]).all() for i in range(1, len(reqs)))  # nothing ever leaves
    secret = np.union1d(_held_out_only(t.orgs[100]), added)
    for what, rows in spy.derived(100):
        assert np.isin(rows, secret).mean() <= 1 / PAD, what


def test_a_cover_layer_holds_pad_times_the_rows_it_hides_drawn_from_the_secret_permutation():
    order = decoy_order(b"k" * 32, "t", 1000)
    assert np.array_equal(np.sort(order), np.arange(1000))
    assert np.array_equal(order, decoy_order(b"k" * 32, "t", 1000))  # fixed for the organisation's secret
    assert not np.array_equal(order, decoy_order(b"j" * 32, "t", 1000))
    taken = np.zeros(1000, bool)
    taken[order[:3]] = True  # already asked for: never drawn as a decoy
    hide = np.array([3, 10, 99, 512])
    decoys, drawn = cover_layer(hide, taken, order, 0, 4.0)
    assert decoys.size == 12 and not np.isin(decoys, hide).any() and not taken[decoys].any()
    assert set(decoys) <= set(order[:drawn]) and drawn >= 15
    more, drawn2 = cover_layer(np.array([7]), taken | np.isin(np.arange(1000), decoys), order, drawn, 4.0)
    assert more.size == 3 and set(more) <= set(order[drawn:drawn2])  # the next layer goes on where this one stopped
    tiny = np.zeros(10, bool)
    tiny[:8] = True
    assert cover_layer(np.array([8]), tiny, np.arange(10), 0, 4.0)[0].tolist() == [9]  # no more rows than the table


def test_a_lost_cover_is_drawn_again_from_the_same_secret_and_mostly_repeats(tmp_path, caplog):
    shapes = {"t": (5000, 4)}
    secret = decoy_key(tmp_path)
    used = {"t": np.arange(0, 400, 2)}
    first = RequestCover.empty(shapes)
    first.show({"t": np.arange(0, 200, 2)})
    asked = first.ask(used, shapes, PAD, secret)["t"]
    first.save(tmp_path, "run")
    assert RequestCover.load(tmp_path, shapes, "run").ask(used, shapes, PAD, secret)["t"].tolist() == asked.tolist()
    assert RequestCover.load(tmp_path, shapes, "other run").shown["t"].size == 0  # per run
    (tmp_path / "sync-cover.npz").write_bytes(b"damaged")
    lost = RequestCover.load(tmp_path, shapes, "run")  # damaged: starts again, no crash, and says so
    assert lost.cover["t"].size == 0 and "sync cover" in caplog.text
    again = lost.ask(used, shapes, PAD, decoy_key(tmp_path))["t"]
    # rebuilt from nothing (its uploads no longer known, so all it uses is covered): the old decoys come back,
    # so intersecting the old request with the new one does not single out the rows it uses
    decoys = np.setdiff1d(asked, used["t"])
    assert np.isin(decoys, again).mean() > 0.9
    both = np.setdiff1d(np.intersect1d(asked, again), first.shown["t"])  # beyond what its uploads showed
    assert np.isin(both, used["t"]).mean() <= 1 / PAD + 0.05


def test_the_cover_survives_a_rebuilt_table_cache(tmp_path):
    t = DirectTransport(tmp_path, 3, task=HELD)
    c = Coordinator(run_config(HELD, rounds=3), t)
    c.run_round(1, sorted(t.orgs))
    before = c.wants[100][0]["ids"].ids.copy()
    org = t.orgs[100]
    for f in org.state.dir.glob("rows.*"):  # its row state lost: freshness is unknown, the cover is not
        f.unlink()
    c.run_round(2, sorted(t.orgs))
    assert np.array_equal(c.wants[100][0]["ids"].ids, before)
    assert RowState.load(org.state.dir, c.shapes, 1, c.cfg.run_key()).version == 1


def test_a_damaged_decoy_secret_is_replaced_loudly(tmp_path, caplog):
    (tmp_path / "sync-decoys.key").write_bytes(b"short")
    key = decoy_key(tmp_path)
    assert len(key) == 32 and decoy_key(tmp_path) == key
    assert "can tell the rows it uses" in caplog.text  # what a new secret costs, in the log


@pytest.mark.slow
def test_a_union_organisation_that_opts_into_padded_hides_every_row_it_uses_under_the_cover(tmp_path):
    spy, t = _run(tmp_path, "padded", 2, secure=True, row_set="union")
    full_t = DirectTransport(tmp_path / "full", 3, task=HELD)
    full = Coordinator(run_config(HELD, rounds=2, secure=True, row_set="union"), full_t)
    for r in (1, 2):
        full.run_round(r, sorted(full_t.orgs))
    assert np.array_equal(full.tables.tables["ids"], spy.c.tables.tables["ids"])  # same tables as the full sync
    for node, org in t.orgs.items():
        assert spy.shown[node][-1].size == 0  # union uploads show no row ids of its own ...
        used = working_set(org.task, spy.c.shapes)["ids"]
        for what, rows in spy.derived(node):  # ... so its training rows are under the cover too
            assert np.isin(rows, used).mean() <= 1 / PAD, f"{org.identity.name}: {what}"
