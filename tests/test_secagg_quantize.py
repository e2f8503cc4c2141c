"""The fixed-point encoding: no wrap, and the documented error bound n / (2 s)."""

from __future__ import annotations

import numpy as np
import pytest

from fedembed.secagg.quantize import dequantize, error_bound, quantize, scale_for
from fedembed.secagg.vector import ValueScales, decode_values, dense_rowset, encode_values
from fedembed.sparse import TableUpdate, sum_updates


@pytest.mark.parametrize("n", [2, 5, 100, 1000])
def test_sum_of_n_values_stays_within_the_documented_bound(n):
    rng = np.random.default_rng(n)
    clip = 400.0
    s = scale_for(clip, n)
    xs = rng.uniform(-clip, clip, size=(n, 20_000))
    xs[:, :10] = clip  # the worst case for wrapping: everyone at the top of the range
    xs[:, 10:20] = -clip
    total = np.zeros(xs.shape[1], dtype=np.uint32)
    for x in xs:
        total += quantize(x, clip, s)
    err = np.abs(dequantize(total, s) - xs.sum(axis=0))
    assert err.max() <= error_bound(n, s)
    assert np.allclose(dequantize(total, s)[:10], n * clip, atol=error_bound(n, s))  # no wrap at the edge


def test_scale_is_integer_so_integer_weights_sum_exactly():
    s = scale_for(100.0, 7)
    assert s == int(s)
    w = np.array([[1, 100, 37, 0]] * 7, dtype=np.float64)
    total = np.zeros(4, dtype=np.uint32)
    for row in w:
        total += quantize(row, 100.0, s)
    assert np.array_equal(dequantize(total, s), w.sum(axis=0))


def test_scale_refuses_a_sum_that_cannot_fit():
    with pytest.raises(ValueError):
        scale_for(2.0**30, 4)


def test_values_vector_round_trip_equals_the_plain_per_row_sum_within_the_bound():
    rng = np.random.default_rng(0)
    shapes = {"a": (500, 8), "b": (300, 4)}
    updates = []
    for _ in range(5):
        upd = {}
        for name, (rows, dim) in shapes.items():
            ids = np.sort(rng.choice(rows, size=40, replace=False))
            delta = rng.normal(0, 0.1, size=(40, dim)).astype(np.float16).astype(np.float32)
            upd[name] = TableUpdate(ids, delta, rng.integers(1, 100, size=40).astype(np.float32))
        updates.append(upd)
    scales = ValueScales(n=5, clip_delta=4.0, max_weight=100.0)
    rowset = dense_rowset(shapes)
    total = None
    for u in updates:
        v, clipped = encode_values(u, rowset, shapes, scales, "float16")
        assert clipped == 0
        total = v if total is None else total + v
    secure = decode_values(total, rowset, shapes, scales, delivered=len(updates))
    plain = sum_updates(updates, list(shapes))
    for name in shapes:
        assert np.array_equal(secure[name].ids, plain[name].ids)
        assert np.array_equal(secure[name].weight, plain[name].weight)  # integer weights: exact
        assert np.abs(secure[name].weighted_delta - plain[name].weighted_delta).max() <= scales.bound()


def test_plain_fixed_point_sum_is_order_independent_and_within_the_bound_of_float_sums():
    from fedembed.secagg.vector import fixed_point_sum

    rng = np.random.default_rng(5)
    shapes = {"t": (1000, 6)}
    updates = []
    for _ in range(6):
        ids = np.sort(rng.choice(1000, size=120, replace=False))
        delta = rng.normal(0, 0.2, size=(120, 6)).astype(np.float16).astype(np.float32)
        updates.append({"t": TableUpdate(ids, delta, rng.integers(1, 100, size=120).astype(np.float32))})
    scales = ValueScales(n=6, clip_delta=4.0, max_weight=100.0)
    a = fixed_point_sum(updates, shapes, scales, "float16")
    b = fixed_point_sum(updates[::-1], shapes, scales, "float16")
    assert np.array_equal(a["t"].weighted_delta, b["t"].weighted_delta)  # exact: integer sums
    ref = sum_updates(updates, ["t"])
    assert np.array_equal(a["t"].ids, ref["t"].ids)
    assert np.abs(a["t"].weighted_delta - ref["t"].weighted_delta).max() <= scales.bound()
    assert np.array_equal(a["t"].weight, ref["t"].weight)
