"""The baselines run in one process, outside the federation's privacy path, and train what they are named after."""

import numpy as np
import pytest
import torch

from conftest import run_config
from fedembed.baselines import run_baseline
from fedembed.baselines.fedavg_all import average_heads
from fedembed.config import ConfigError
from fedembed.coordinator import Coordinator
from fedembed.tables import init_table
from fedembed.task import TaskSpec, load_task
from fedembed.train import build_seeded

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})
NAMES = ["org-0", "org-1", "org-2"]


def _tasks(spec=TASK, n=3):
    return [load_task(spec.for_org(i, n)) for i in range(n)]


def test_a_coordinator_refuses_to_run_a_baseline(tmp_path, direct_transport):
    for mode in ("local", "fedavg-all", "pooled"):
        with pytest.raises(ConfigError, match="baseline that runs in one process"):
            Coordinator(run_config(TASK, rounds=1, mode=mode), direct_transport(tmp_path / mode, 3, task=TASK))


def test_local_never_shares_a_row_and_repeats_exactly():
    cfg = run_config(TASK, rounds=2, mode="local")
    log1, tables = run_baseline(cfg, _tasks(), NAMES)
    log2, _ = run_baseline(cfg, _tasks(), NAMES)
    assert tables is None  # nothing shared, nothing to write
    assert log1.to_dict()["final"] == log2.to_dict()["final"]  # seeded from --seed and the names
    assert set(log1.initial) == set(NAMES) and all(r["clients"] == 3 for r in log1.rounds)
    # organisations alone differ from each other; the run's seed changes what each gets
    other, _ = run_baseline(run_config(TASK, rounds=2, mode="local", seed=1), _tasks(), NAMES)
    assert other.to_dict()["final"] != log1.to_dict()["final"]


def test_fedavg_all_ends_with_one_head_and_the_federations_tables():
    cfg = run_config(TASK, rounds=2, mode="fedavg-all")
    tasks = _tasks()
    runlog, tables = run_baseline(cfg, tasks, NAMES)
    assert tables["products"].shape == (400, 16)
    start = init_table("products", (400, 16), cfg.seed, cfg.table_scale)
    assert np.abs(tables["products"] - start).sum(1).nonzero()[0].size > 0  # the averaged rows moved
    final = runlog.to_dict()["final"]
    assert set(final) == set(NAMES) | {"mean"} and all(np.isfinite(m["score"]) for m in final.values())


def test_average_heads_weights_by_examples():
    a = {"w": np.zeros(3, np.float32)}
    b = {"w": np.full(3, 4.0, np.float32)}
    np.testing.assert_allclose(average_heads([(a, 1.0), (b, 3.0)])["w"], 3.0)
    np.testing.assert_allclose(average_heads([(a, 0.0), (b, 0.0)])["w"], 2.0)  # no examples: equal weights


def test_fedavg_all_refuses_heads_that_differ_naming_each_organisation():
    # movies "mixed": organisations predict different targets, so their heads differ in shape
    mixed = TaskSpec("movies", {"orgs": 3, "scenario": "mixed", "dim": 8})
    tasks = _tasks(mixed)
    names = ["United States", "France", "United Kingdom"]
    with pytest.raises(ConfigError, match="heads differ from United States's") as err:
        run_baseline(run_config(mixed, rounds=1, mode="fedavg-all"), tasks, names)
    assert "France" in str(err.value) and "United Kingdom" in str(err.value)


def test_build_seeded_gives_the_same_head_for_the_same_seed_and_name_only():
    task = _tasks()[0]
    h = lambda seed, who: build_seeded(task, seed, who).head_state_dict()  # noqa: E731
    a, b, c, d = h(0, "org-0"), h(0, "org-0"), h(1, "org-0"), h(0, "org-1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)


def _users_items(n=3):
    from pathlib import Path

    spec = TaskSpec(f"{Path(__file__).parent / 'tasks_fixture.py'}:UsersItemsTask", {"orgs": n})
    return spec, [load_task(spec.for_org(i, n)) for i in range(n)]


def test_pooled_keeps_the_coordinators_step_of_each_table_as_a_share_of_the_epochs_move():
    """A table the coordinator moves by half its sum (``users``, 200 rows, carries the pooled
    normaliser) ends pooled's epoch half way along that epoch's move; ``items`` (3,000 rows)
    keeps its whole move, bit for bit as with the whole step."""
    spec, _ = _users_items()
    start = {n: init_table(n, s, 0, run_config(spec).table_scale) for n, s in run_config(spec).federation.shapes().items()}
    moved = {}
    for lr in (0.5, 1.0):  # the same epoch (same data, seeds, batches): only the kept share differs
        _, tables = run_baseline(run_config(spec, rounds=1, mode="pooled", pooled_server_lr=lr), _users_items()[1],
                                 NAMES)
        moved[lr] = {n: tables[n].astype(np.float64) - start[n] for n in start}
    assert np.abs(moved[1.0]["users"]).max() > 1e-3  # it moved: the comparison below can fail
    np.testing.assert_allclose(moved[0.5]["users"], 0.5 * moved[1.0]["users"], rtol=1e-4, atol=1e-6)
    assert np.array_equal(moved[0.5]["items"], moved[1.0]["items"])
    # an adaptive server step has no one-trajectory analogue: pooled keeps the whole move
    _, tables = run_baseline(run_config(spec, rounds=1, mode="pooled", server_lr=0.5, pooled_server_lr=0.5,
                                        server_optimizer="adam"), _users_items()[1], NAMES)
    for name in start:
        assert np.array_equal(tables[name].astype(np.float64) - start[name], moved[1.0][name])


def test_local_keeps_the_same_share_of_each_organisations_epoch_move():
    """``local`` is a federation of one: each organisation's small table keeps ``pooled_server_lr`` of
    its epoch's move. Its scores differ from the whole step's; a large table alone is untouched."""
    from fedembed.train import snapshot_tables, train_alone

    spec, tasks = _users_items()
    cfg = run_config(spec, rounds=1, mode="local")
    shapes = cfg.federation.shapes()
    ends = {}
    for keep in ({"users": 0.5}, None):
        model = build_seeded(tasks[0], 0, "org-0")
        model.set_tables({n: init_table(n, s, 0, cfg.table_scale) for n, s in shapes.items()})
        start = snapshot_tables(model, shapes)
        train_alone(tasks[0], model, cfg.train, None, 0, "org-0", 1, keep)
        ends[keep is None] = {n: (model.table(n).weight.detach() - start[n]).double().numpy() for n in shapes}
    assert np.abs(ends[True]["users"]).max() > 1e-3
    np.testing.assert_allclose(ends[False]["users"], 0.5 * ends[True]["users"], rtol=1e-4, atol=1e-6)
    assert np.array_equal(ends[False]["items"], ends[True]["items"])
    # and the baseline passes the coordinator's step: its metrics move with pooled_server_lr
    half, _ = run_baseline(run_config(spec, rounds=2, mode="local", pooled_server_lr=0.5), tasks, NAMES)
    whole, _ = run_baseline(run_config(spec, rounds=2, mode="local", pooled_server_lr=1.0), _users_items()[1], NAMES)
    assert half.to_dict()["final"] != whole.to_dict()["final"]
