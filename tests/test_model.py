"""The split of a user's model into shared tables and a private head."""

import numpy as np
import pytest
import torch
from torch import nn

from fedembed.model import SplitError, SplitModel


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.users = nn.Embedding(50, 4)
        self.enc = nn.Module()
        self.enc.items = nn.EmbeddingBag(30, 4, mode="sum", sparse=True)
        self.out = nn.Linear(8, 2)

    def forward(self, u, i, off):
        return self.out(torch.cat([self.users(u), self.enc.items(i, off)], 1))


def test_split_names_tables_and_keeps_everything_else_as_head():
    m = SplitModel(TwoTables(), tables={"users": "users", "items": "enc.items"})
    assert m.table_names == ["items", "users"]
    assert m.table_shapes() == {"items": (30, 4), "users": (50, 4)}
    head = dict(m.head_named_parameters())
    assert set(head) == {"out.weight", "out.bias"}
    assert set(m.head_state_dict()) == {"out.weight", "out.bias"}


def test_split_switches_dense_tables_to_sparse_gradients():
    m = SplitModel(TwoTables(), tables={"users": "users", "items": "enc.items"})
    out = m(torch.tensor([1, 2]), torch.tensor([3, 4, 5]), torch.tensor([0, 1]))
    out.sum().backward()
    assert m.table("users").weight.grad.is_sparse
    assert m.table("items").weight.grad.is_sparse


def test_split_rejects_missing_or_non_embedding_modules():
    with pytest.raises(SplitError, match="no submodule"):
        SplitModel(TwoTables(), tables=["nope"])
    with pytest.raises(SplitError, match="expected nn.Embedding"):
        SplitModel(TwoTables(), tables=["out"])
    with pytest.raises(SplitError, match="at least one"):
        SplitModel(TwoTables(), tables=[])


def test_set_tables_round_trips_and_checks_shape():
    m = SplitModel(TwoTables(), tables={"users": "users", "items": "enc.items"})
    t = {n: np.random.default_rng(0).standard_normal(s).astype(np.float32) for n, s in m.table_shapes().items()}
    m.set_tables(t)
    got = m.get_tables()
    assert all(np.array_equal(got[n], t[n]) for n in t)
    with pytest.raises(SplitError, match="shape"):
        m.set_tables({"users": np.zeros((3, 4), np.float32)})


def test_head_state_loads_into_a_fresh_model():
    a = SplitModel(TwoTables(), tables=["users"])
    b = SplitModel(TwoTables(), tables=["users"])
    b.load_head_state_dict(a.head_state_dict())
    assert torch.equal(a.module.out.weight, b.module.out.weight)
    assert not torch.equal(a.module.users.weight, b.module.users.weight)  # tables untouched
