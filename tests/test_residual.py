"""The private per-organisation residual on a shared table."""

import numpy as np
import pytest
import torch
from torch import nn

from fedembed.residual import ResidualTable
from fedembed.task import TaskSpec, load_task
from fedembed.recipe import TrainConfig
from fedembed.train import make_head_optimizer, train_local


def test_lookup_is_the_shared_row_plus_the_residual_row():
    shared = nn.EmbeddingBag(20, 3, mode="mean", sparse=True)
    r = ResidualTable(shared)
    with torch.no_grad():
        r.residual.weight.normal_()
    ids, offsets = torch.tensor([1, 2, 5, 7]), torch.tensor([0, 2])
    expected = nn.functional.embedding_bag(ids, shared.weight + r.residual.weight, offsets, mode="mean")
    torch.testing.assert_close(r(ids, offsets), expected)


def test_max_mode_bag_is_refused():
    with pytest.raises(ValueError, match="linear"):
        ResidualTable(nn.EmbeddingBag(5, 2, mode="max"))


def test_residual_is_head_state_and_not_a_shared_table():
    task = load_task(TaskSpec("movies", {"org": 0, "orgs": 3, "seed": 0}))
    m = task.build_model()
    before = m.get_tables()
    m.add_residuals()
    m.add_residuals()  # idempotent
    assert len(m.residual_parameters()) == 1
    assert all(p is not m.residual_parameters()[0] for p in m.table_parameters())
    assert "ids.residual.weight" in m.head_state_dict()
    assert "ids.shared.weight" not in m.head_state_dict()
    assert all(id(p) != id(m.residual_parameters()[0]) for p in m.head_parameters())  # sparse: not the Adam head's
    np.testing.assert_array_equal(m.get_tables()["ids"], before["ids"])


def test_training_moves_the_residual_but_the_update_carries_only_shared_deltas():
    task = load_task(TaskSpec("movies", {"org": 2, "orgs": 3, "seed": 0}))
    m = task.build_model()
    m.add_residuals()
    start = m.get_tables()
    cfg = TrainConfig(residual=True)
    update, _ = train_local(task, m, cfg, make_head_optimizer(m, cfg, None), np.random.default_rng(0), start)
    res = m.residual_parameters()[0].detach().numpy()
    touched = np.flatnonzero(np.abs(res).sum(1))
    u = update["ids"]
    assert touched.size > 0 and set(touched.tolist()) <= set(u.ids.tolist())
    np.testing.assert_allclose(u.delta, m.get_tables()["ids"][u.ids] - start["ids"][u.ids], atol=1e-6)
    assert not np.allclose(u.delta, 0.0)
