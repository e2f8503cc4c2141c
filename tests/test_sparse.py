"""Row-sparse updates: validation, per-row sums, wire encode/decode."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedembed.sparse import TableUpdate, UpdateError, sum_updates, validate_update
from fedembed.wire import decode_update, encode_update

SHAPES = {"t": (10, 3)}


def upd(ids, delta, weight):
    return {"t": TableUpdate(np.array(ids, np.int64), np.array(delta, np.float32).reshape(len(ids), 3), np.array(weight, np.float32))}


def test_mean_is_over_organisations_that_touched_the_row_only():
    a = upd([1, 2], [[1, 1, 1], [2, 2, 2]], [1, 1])
    b = upd([2, 7], [[4, 4, 4], [5, 5, 5]], [3, 1])
    s = sum_updates([a, b], ["t"])["t"]
    assert s.ids.tolist() == [1, 2, 7]
    mean = s.mean()
    np.testing.assert_allclose(mean[0], 1.0)  # only org a touched row 1: not halved
    np.testing.assert_allclose(mean[1], (2 * 1 + 4 * 3) / 4)
    np.testing.assert_allclose(mean[2], 5.0)


def test_rows_with_zero_total_weight_are_dropped():
    s = sum_updates([upd([4], [[1, 1, 1]], [0])], ["t"])["t"]
    assert s.ids.size == 0


@pytest.mark.parametrize(
    "update, fault",
    [
        (upd([1, 12], [[0] * 3, [0] * 3], [1, 1]), "out of range"),
        (upd([-1], [[0] * 3], [1]), "out of range"),
        (upd([3, 3], [[0] * 3, [0] * 3], [1, 1]), "duplicated"),
        (upd([5, 2], [[0] * 3, [0] * 3], [1, 1]), "duplicated or unsorted"),
        (upd([2], [[np.nan, 0, 0]], [1]), "NaN"),
        (upd([2], [[np.inf, 0, 0]], [1]), "NaN or inf"),
        (upd([2], [[0, 0, 0]], [-1]), "weights"),
        ({"t": TableUpdate(np.array([1]), np.zeros((1, 4), np.float32), np.ones(1, np.float32))}, "delta shape"),
        ({"zz": TableUpdate(np.array([1]), np.zeros((1, 3), np.float32), np.ones(1, np.float32))}, "unknown table"),
    ],
)
def test_validate_rejects_bad_updates_with_the_fault_named(update, fault):
    with pytest.raises(UpdateError, match=fault):
        validate_update(update, SHAPES)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_wire_round_trip_keeps_ids_weights_and_deltas(dtype):
    rng = np.random.default_rng(1)
    u = upd([0, 3, 9], rng.standard_normal(9) * 0.01, [1, 2, 3])
    rec = encode_update(u, SHAPES, dtype)
    assert rec["t.ids"].dtype == "int32" and rec["t.delta"].dtype == dtype
    back = decode_update(rec, SHAPES)
    assert back["t"].ids.tolist() == [0, 3, 9]
    tol = 1e-3 * 0.05 if dtype == "float16" else 0
    np.testing.assert_allclose(back["t"].delta, u["t"].delta, atol=tol)
    np.testing.assert_array_equal(back["t"].weight, u["t"].weight)


def test_decode_rejects_unreadable_and_incomplete_records():
    bad = ArrayRecord({"t.ids": Array(dtype="int64", shape=(2,), stype="numpy.ndarray", data=b"garbage")})
    with pytest.raises(UpdateError, match="cannot be decoded"):
        decode_update(bad, SHAPES)
    rec = encode_update(upd([1], [[0, 0, 0]], [1]), SHAPES)
    del rec["t.weight"]
    with pytest.raises(UpdateError, match="lacks"):
        decode_update(rec, SHAPES)
    rec = encode_update(upd([1], [[0, 0, 0]], [1]), SHAPES)
    rec["t.extra"] = Array(np.zeros(1))
    with pytest.raises(UpdateError, match="unexpected"):
        decode_update(rec, SHAPES)


def test_weights_above_the_cap_are_refused():
    with pytest.raises(UpdateError, match="cap"):
        decode_update(encode_update(upd([1], [[0, 0, 0]], [500]), SHAPES), SHAPES, max_weight=100)
