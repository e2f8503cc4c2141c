"""Issue 12: early stopping on validation, server-side adaptive optimisers, drift correction, FedRep order."""

import json

import numpy as np
import pytest
from conftest import run_config

from fedembed.aggregate import ServerOptimizer
from fedembed.baselines import run_baseline
from fedembed.coordinator import Coordinator
from fedembed.recipe import RecipeError, TrainConfig
from fedembed.sparse import TableSum
from fedembed.stopping import BestTracker, Evaluations, stalled
from fedembed.tables import VersionedTables
from fedembed.task import TaskSpec, load_task
from fedembed.train import build_seeded, make_head_optimizer, round_rng, train_local

TASK = TaskSpec("synthetic", {"orgs": 3, "rows": 2000, "examples": 300, "dim": 8})


def test_best_tracker_selects_on_validation_only_and_keeps_the_earlier_of_ties():
    t = BestTracker()
    a = t.update("o", 1, {"val_score": 0.5, "score": 0.1})
    assert a["best_round"] == 1 and a["best_score"] == 0.1
    b = t.update("o", 2, {"val_score": 0.4, "score": 0.9})  # better on test, worse on validation: not served
    assert b["best_round"] == 1 and b["best_score"] == 0.1 and b["score"] == 0.9
    c = t.update("o", 3, {"val_score": 0.5, "score": 0.8})  # a tie: the earlier state stays
    assert c["best_round"] == 1
    d = t.update("o", 4, {"val_score": float("nan"), "score": 1.0})
    assert d["best_round"] == 1
    e = t.update("o", 5, {"val_score": 0.6, "score": 0.2})
    assert e["best_round"] == 5 and e["best_val_score"] == 0.6


def test_stalled_counts_evaluations_without_any_improvement():
    h = [{"a": {"val_score": 0.1}, "b": {"val_score": 0.1}},
         {"a": {"val_score": 0.3}, "b": {"val_score": 0.1}},
         {"a": {"val_score": 0.2}, "b": {"val_score": 0.2}},
         {"a": {"val_score": 0.2}, "b": {"val_score": 0.1}},
         {"a": {"val_score": 0.3}, "b": {}}]
    assert not stalled(h, 0)
    assert not stalled(h[:3], 2)  # b improved in the last of them
    assert stalled(h, 2) and not stalled(h, 3)
    ev = Evaluations(serve_best=True, patience=1)
    assert ev.record(0, "a", {"val_score": 0.5, "score": 0.5})["best_round"] == 0
    ev.record(1, "a", {"val_score": 0.4})
    assert ev.stalled()
    with pytest.raises(RecipeError):
        TrainConfig(patience=-1)


def _agg(ids, d):
    ids = np.asarray(ids, dtype=np.int64)
    return {"t": TableSum(ids, np.asarray(d, dtype=np.float64), np.ones(len(ids)))}


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_adaptive_server_optimizers_step_touched_rows_only_with_per_row_state(name):
    tables = VersionedTables.initial({"t": (6, 3)}, 0, 0.1)
    before = tables.tables["t"].copy()
    opt = ServerOptimizer(name, lr=0.1)
    d = np.array([[1.0, -2.0, 2.0], [0.01, 0.0, -0.01]])
    assert opt.step(tables, _agg([1, 4], d), 1) == 2
    moved = tables.tables["t"] - before
    untouched = [0, 2, 3, 5]
    assert np.array_equal(moved[untouched], 0 * moved[untouched])
    # first step, bias-corrected: d / rms(d) per row, times lr: every row moves by its direction at lr scale
    for r, row in zip([1, 4], d):
        expect = 0.1 * row / (np.sqrt(np.mean(row**2)) + opt.eps)
        assert moved[r] == pytest.approx(expect, rel=1e-4)
    assert opt.state["t.t"].tolist() == [0, 1, 0, 0, 1, 0]
    opt.step(tables, _agg([1], d[:1]), 2)
    assert opt.state["t.t"].tolist() == [0, 2, 0, 0, 1, 0]  # row 4 keeps its state until it is touched


def test_proximal_pull_keeps_rows_near_their_synced_value():
    task = load_task(TASK.for_org(0, 3))
    deltas = []
    for mu in (0.0, 5.0):
        model = build_seeded(task, 0, "org-0")
        start = {n: t.copy() for n, t in model.get_tables().items()}
        cfg = TrainConfig(prox_mu=mu)
        update, _ = train_local(task, model, cfg, make_head_optimizer(model, cfg, None), round_rng(0, "org-0", 1), start)
        deltas.append(np.abs(update["ids"].delta).mean())
    assert deltas[1] < 0.8 * deltas[0]


def test_patience_stops_a_federated_run_and_a_baseline_early_and_reports_the_best_state(tmp_path, direct_transport):
    train = TrainConfig(patience=1, lr_decay=0.01)  # learning rates vanish after round 1: nothing improves after 2
    cfg = run_config(TASK, rounds=8, train=train)
    c = Coordinator(cfg, direct_transport(tmp_path, 3, task=TASK))
    doc = c.run().to_dict()
    stop = doc["stopped_early"]
    assert stop < 8 and len(doc["rounds"]) == stop
    for org, m in doc["final"].items():
        if org == "mean":
            continue
        hist = {0: doc["initial"][org], **{r["round"]: r["metrics"][org] for r in doc["rounds"]}}
        best = max(sorted(hist), key=lambda r: hist[r]["val_score"])  # the first of the best, on validation
        assert m["best_round"] == best and m["best_score"] == hist[best]["score"]
    tasks = [load_task(TASK.for_org(i, 3)) for i in range(3)]
    runlog, _ = run_baseline(run_config(TASK, rounds=8, mode="local", train=train), tasks, [f"org-{i}" for i in range(3)])
    assert runlog.extra["stopped_early"] < 8
    assert all("best_score" in m for m in runlog.to_dict()["final"].values())


def test_keep_best_state_keeps_the_served_head_and_tables(tmp_path, direct_transport):
    cfg = run_config(TASK, rounds=2, train=TrainConfig(keep_best_state=True))
    doc = Coordinator(cfg, direct_transport(tmp_path, 3, task=TASK)).run().to_dict()
    for i in range(3):
        best = tmp_path / f"org-{i}" / "best"
        assert (best / "best.json").exists() and (best / "head.pt").exists() and (best / "tables.npz").exists()
        assert json.loads((best / "tables.json").read_text())["version"] == doc["final"][f"org-{i}"]["best_round"]


def test_sum_step_adds_up_the_organisations_deltas_each_counted_up_to_the_cap():
    tables = VersionedTables.initial({"t": (4, 2)}, 0, 0.1)
    before = tables.tables["t"].copy()
    # row 1: two organisations at full weight (deltas 1 and 3); row 2: one organisation at half the cap
    agg = {"t": TableSum(np.array([1, 2]), np.array([[4.0, 4.0], [1.0, 1.0]]), np.array([2.0, 0.5]))}
    ServerOptimizer("sum", lr=1.0, weight_cap=1.0).step(tables, agg, 1)
    moved = tables.tables["t"] - before
    assert moved[1] == pytest.approx([4.0, 4.0]) and moved[2] == pytest.approx([1.0, 1.0])
    tables = VersionedTables.initial({"t": (4, 2)}, 0, 0.1)
    ServerOptimizer("sum", lr=1.0, weight_cap=2.0).step(tables, agg, 1)
    assert (tables.tables["t"] - before)[1] == pytest.approx([2.0, 2.0])
    with pytest.raises(ValueError):
        ServerOptimizer("sum", weight_cap=0.5)
