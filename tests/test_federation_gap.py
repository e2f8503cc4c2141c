"""Issue 12: early stopping on validation, server-side adaptive optimisers, drift correction, FedRep order."""

import json

import numpy as np
import torch
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


def _count_steps(opt) -> list[int]:
    """Count ``opt.step()`` calls (the list's one element)."""
    calls = [0]
    step = opt.step

    def counted(*a, **k):
        calls[0] += 1
        return step(*a, **k)

    opt.step = counted
    return calls


@pytest.mark.parametrize("head_epochs", [0.25, 1.5])
def test_a_fractional_head_refit_takes_that_share_of_an_epochs_batches_and_leaves_the_tables(head_epochs):
    from fedembed.train import fit_head, head_steps

    task = load_task(TASK.for_org(0, 3))
    model = build_seeded(task, 0, "org-0")
    cfg = TrainConfig(head_epochs=head_epochs)
    batches = -(-task.num_examples("train") // cfg.batch_size)
    assert head_steps(task, cfg) == int(np.ceil(head_epochs * batches)) and head_steps(task, TrainConfig()) == 0
    tables = {n: t.copy() for n, t in model.get_tables().items()}
    head = {k: v.clone() for k, v in model.head_state_dict().items()}
    opt = make_head_optimizer(model, cfg, None)
    calls = _count_steps(opt)
    fit_head(task, model, cfg, opt, round_rng(0, "org-0", 1))
    assert calls[0] == head_steps(task, cfg)
    assert all(np.array_equal(tables[n], t) for n, t in model.get_tables().items())
    assert any(not torch.equal(head[k], v) for k, v in model.head_state_dict().items())
    assert all(p.requires_grad for p in model.table_parameters())  # unfrozen again


def test_head_epochs_take_a_fraction_on_the_command_line_and_refuse_a_negative_one():
    from fedembed.cli import build_parser

    args = build_parser().parse_args(["simulate", "--head-epochs", "0.25"])
    assert args.head_epochs == 0.25
    assert TrainConfig.from_dict({"head_epochs": 0.25}).head_epochs == 0.25
    with pytest.raises(RecipeError):
        TrainConfig(head_epochs=-0.5)
    with pytest.raises(RecipeError):
        TrainConfig(freeze_head=True)  # the head would never train
    TrainConfig(freeze_head=True, head_epochs=0.25)


def test_pooled_refits_every_head_on_its_own_batches_with_the_shared_tables_frozen():
    from fedembed.baselines.pooled import refit_heads
    from fedembed.train import head_steps

    tasks = [load_task(TASK.for_org(i, 3)) for i in range(3)]
    models = [build_seeded(t, 0, f"org-{i}") for i, t in enumerate(tasks)]
    for m in models[1:]:  # tied as run_pooled ties them
        m.table("ids").weight = models[0].table("ids").weight
    shared = {id(p) for p in models[0].table_parameters()}  # tied into every model, as run_pooled filters it
    heads = [p for m in models for p in m.head_parameters() if id(p) not in shared]
    opt = torch.optim.Adam(heads, lr=0.01)
    before_heads = [p.detach().clone() for p in heads]
    before_table = models[0].get_tables()["ids"].copy()
    cfg = TrainConfig(head_epochs=0.5)
    assert refit_heads(tasks, models, opt, cfg, np.random.default_rng(0)) == sum(head_steps(t, cfg) for t in tasks)
    assert np.array_equal(models[0].get_tables()["ids"], before_table)
    moved = [not torch.equal(b, p) for b, p in zip(before_heads, heads)]
    assert all(moved)  # every organisation's head took steps
    assert refit_heads(tasks, models, opt, TrainConfig(), np.random.default_rng(0)) == 0


def test_pooled_follows_the_head_refit_and_freeze_head_of_the_recipe_and_repeats():
    tasks = [load_task(TASK.for_org(i, 3)) for i in range(3)]
    names = [f"org-{i}" for i in range(3)]

    def scores(**train):
        cfg = run_config(TASK, rounds=2, mode="pooled", train=TrainConfig(**train))
        runlog, tables = run_baseline(cfg, tasks, names)
        doc = runlog.to_dict()
        return [{o: m["score"] for o, m in r["metrics"].items()} for r in doc["rounds"]], tables["ids"]

    plain, t_plain = scores()
    refit, t_refit = scores(head_epochs=0.5)
    again, t_again = scores(head_epochs=0.5)
    frozen, _ = scores(head_epochs=0.5, freeze_head=True)
    assert refit == again and np.array_equal(t_refit, t_again)
    assert refit != plain and not np.array_equal(t_refit, t_plain)
    assert frozen != refit


def test_a_federated_run_with_a_fractional_head_refit_repeats_exactly(tmp_path, direct_transport):
    cfg = run_config(TASK, rounds=2, train=TrainConfig(head_epochs=0.25))
    docs, tables = [], []
    for i in range(2):
        c = Coordinator(cfg, direct_transport(tmp_path / str(i), 3, task=TASK))
        docs.append(c.run().to_dict())
        tables.append(c.tables.tables["ids"].copy())
    assert docs[0]["final"] == docs[1]["final"] and np.array_equal(tables[0], tables[1])
