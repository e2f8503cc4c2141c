"""Local training: touched rows, lookup-count weights, deltas against the synced tables."""

import numpy as np

from fedembed.task import TaskSpec, load_task
from fedembed.recipe import TrainConfig
from fedembed.train import make_head_optimizer, train_local


def test_update_carries_exactly_the_rows_the_training_data_looked_up():
    task = load_task(TaskSpec("examples.my_task:ClicksTask", {"org": 0, "orgs": 2, "products": 3000}))
    model = task.build_model()
    start = model.get_tables()
    cfg = TrainConfig(max_row_weight=2, batch_size=64)
    update, stats = train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(0), start)
    x = task.x
    train_ids, counts = np.unique(x[:400], return_counts=True)
    u = update["products"]
    assert u.ids.tolist() == train_ids.tolist()
    np.testing.assert_array_equal(u.weight, np.minimum(counts, 2))
    now = model.get_tables()["products"]
    np.testing.assert_allclose(u.delta, now[u.ids] - start["products"][u.ids], atol=1e-7)
    untouched = np.setdiff1d(np.arange(3000), u.ids)
    assert np.array_equal(now[untouched], start["products"][untouched])  # sparse optimizer left them alone
    assert stats["examples"] == 400 and stats["steps"] == 7


def test_local_baseline_computes_no_update():
    task = load_task(TaskSpec("examples.my_task:ClicksTask", {"org": 1, "orgs": 2, "products": 300}))
    model = task.build_model()
    cfg = TrainConfig()
    update, _ = train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(0), None)
    assert update == {}


def test_table_optimizer_state_of_touched_rows_carries_over_rounds(tmp_path):
    task = load_task(TaskSpec("examples.my_task:ClicksTask", {"org": 0, "orgs": 2, "products": 3000}))
    cfg = TrainConfig(keep_table_state=True, batch_size=64)
    state: dict = {}
    model = task.build_model()
    train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(0), model.get_tables(), state)
    ids = state["products"]["ids"].numpy()
    assert state["step"] == 7
    assert set(ids.tolist()) == set(np.unique(task.x[:400]).tolist())
    from fedembed.store import OrgState

    OrgState(tmp_path).save_head({}, {}, 1, table_state=state)
    back = OrgState(tmp_path).load_head()["table_state"]
    model2 = task.build_model()
    opt = __import__("torch").optim.SparseAdam(model2.table_parameters(), lr=0.01)
    from fedembed.train import _load_table_state

    _load_table_state(opt, model2, back)
    st = opt.state[model2.table("products").weight]
    assert st["step"] == 7
    assert np.allclose(st["exp_avg_sq"][ids].numpy(), state["products"]["exp_avg_sq"].numpy())
