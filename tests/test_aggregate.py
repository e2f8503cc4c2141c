"""Server optimizer steps, version stamps and row sync."""

import numpy as np
import pytest

from fedembed.aggregate import ServerOptimizer
from fedembed.sparse import TableSum
from fedembed.tables import VersionedTables, apply_sync, init_table


def agg(ids, mean):
    ids = np.array(ids)
    mean = np.asarray(mean, np.float64)
    return {"t": TableSum(ids, mean * 2.0, np.full(len(ids), 2.0))}


def test_version_zero_is_regenerated_identically_from_the_seed():
    a = init_table("t", (100, 8), seed=3, scale=0.1)
    b = init_table("t", (100, 8), seed=3, scale=0.1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, init_table("u", (100, 8), seed=3, scale=0.1))
    assert not np.array_equal(a, init_table("t", (100, 8), seed=4, scale=0.1))
    assert abs(a.std() - 0.1) < 0.01


def test_sgd_with_lr_one_adds_the_mean_delta_to_touched_rows_only():
    vt = VersionedTables.initial({"t": (6, 2)}, seed=0, scale=0.1)
    before = vt.tables["t"].copy()
    ServerOptimizer("sgd", 1.0).step(vt, agg([1, 4], [[1, 2], [3, 4]]), version=1)
    np.testing.assert_allclose(vt.tables["t"][[1, 4]], before[[1, 4]] + [[1, 2], [3, 4]], rtol=1e-6)
    untouched = [0, 2, 3, 5]
    assert np.array_equal(vt.tables["t"][untouched], before[untouched])
    assert vt.versions["t"].tolist() == [0, 1, 0, 0, 1, 0]
    assert vt.version == 1


def test_rowwise_adagrad_normalises_by_the_rows_accumulated_square():
    vt = VersionedTables.initial({"t": (3, 2)}, seed=0, scale=0.0)
    opt = ServerOptimizer("adagrad", lr=0.1, eps=0.0)
    opt.step(vt, agg([0], [[2.0, 2.0]]), version=1)
    np.testing.assert_allclose(vt.tables["t"][0], [0.1, 0.1], rtol=1e-6)  # d / sqrt(d^2) = sign
    opt.step(vt, agg([0], [[2.0, 2.0]]), version=2)
    np.testing.assert_allclose(vt.tables["t"][0], [0.1 + 0.1 / np.sqrt(2), 0.1 + 0.1 / np.sqrt(2)], rtol=1e-6)
    assert opt.state["t"][1] == 0


def test_a_table_given_its_own_learning_rate_moves_by_it_and_the_others_by_lr():
    vt = VersionedTables.initial({"t": (3, 2), "u": (3, 2)}, seed=0, scale=0.0)
    both = {**agg([0], [[1.0, 2.0]]), "u": agg([0], [[1.0, 2.0]])["t"]}
    ServerOptimizer("sum", 1.0, weight_cap=1.0, table_lr={"t": 0.5}).step(vt, both, version=1)
    np.testing.assert_allclose(vt.tables["t"][0], [1.0, 2.0], rtol=1e-6)  # 0.5 x the sum (weight 2: 2 x mean)
    np.testing.assert_allclose(vt.tables["u"][0], [2.0, 4.0], rtol=1e-6)  # the sum
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="table 't'"):
            ServerOptimizer("sum", table_lr={"t": bad})


def test_unknown_server_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("rmsprop")


def test_rows_since_carries_only_rows_changed_after_that_version():
    vt = VersionedTables.initial({"t": (8, 2)}, seed=0, scale=0.1)
    opt = ServerOptimizer()
    opt.step(vt, agg([1, 2], [[1, 1], [1, 1]]), version=1)
    opt.step(vt, agg([2, 5], [[1, 1], [1, 1]]), version=2)
    assert vt.rows_since(0)["t"].ids.tolist() == [1, 2, 5]
    assert vt.rows_since(1)["t"].ids.tolist() == [2, 5]
    assert vt.rows_since(2)["t"].ids.tolist() == []


def test_a_cache_patched_with_rows_since_equals_the_coordinators_tables():
    vt = VersionedTables.initial({"t": (50, 4)}, seed=7, scale=0.1)
    cache = {"t": init_table("t", (50, 4), 7, 0.1)}
    opt = ServerOptimizer()
    rng = np.random.default_rng(0)
    seen = 0
    for v in range(1, 6):
        ids = np.unique(rng.integers(0, 50, 6))
        opt.step(vt, agg(ids, rng.standard_normal((ids.size, 4))), version=v)
        if v % 2 == 0:  # this org syncs every other round only
            apply_sync(cache, vt.rows_since(seen))
            seen = v
            assert np.array_equal(cache["t"], vt.tables["t"])
