"""A hostile organisation's secure values are bounded: the coordinator refuses an out-of-bounds sum.

Clipping happens in the sender, before masking, so the coordinator can only check the
unmasked *sum* against what honest organisations can produce (see "Bounds on an unmasked
sum" in :mod:`fedembed.secagg.vector`). Each attack test runs through the real encoder and
both a plain modular sum and the real SecAgg+ masking and unmasking
(:mod:`fedembed.secagg.protocol`), and pins the message of the bound that stops it, so it
fails if that check is removed (another bound catching it by accident does not count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from fedembed.secagg.protocol import SecurePolicy
from fedembed.secagg.quantize import quantize
from fedembed.secagg.vector import (
    RowSet,
    ValueScales,
    decode_values,
    dense_rowset,
    encode_values,
    fixed_point_sum,
    indicator_dtype,
    indicator_vector,
    rowset_from_counts,
    values_length,
)
from fedembed.sparse import RowUpdate, TableUpdate, UpdateError, sum_updates

from secagg_harness import Harness  # tests/: drives the protocol state machines

SHAPES = {"items": (200, 8), "users": (120, 4)}
N = 4
SCALES = ValueScales(n=N, clip_delta=1.0, max_weight=100.0)

Vectors = dict[str, list[np.ndarray]]  # phase -> one vector per organisation (index = org)
Tamper = Callable[[str, dict[int, np.ndarray]], dict[int, np.ndarray]]  # phase, masked by org -> masked by org


# ---------------------------------------------------------------- helpers
def _modular_sum(vectors: Vectors, tamper: Tamper | None = None) -> dict[str, np.ndarray]:
    """The sum the coordinator would unmask, without masks (wraps like the real one)."""
    out = {}
    for phase, vs in vectors.items():
        total = np.zeros_like(vs[0])
        for v in vs:
            total += v
        out[phase] = total
    return out


def _protocol_sum(vectors: Vectors, tamper: Tamper | None = None) -> dict[str, np.ndarray]:
    """The same sum through real SecAgg+ sessions (:mod:`secagg_harness`): signed adverts,
    shares, masking, the consistency check and unmasking, no dropouts. Org ``i`` is party ``i + 1``.

    ``tamper`` rewrites the masked vectors of a phase before the coordinator adds them
    (a hostile organisation sending something other than its masked vector).
    """
    phases = list(vectors)
    n = len(vectors[phases[0]])
    h = Harness(n, phases, policy=SecurePolicy(min_neighbours=min(2, n - 1)))  # two orgs: one neighbour each
    h.share()
    for p in h.clients:
        assert not h.accept(p)  # no complaints
    out = {}
    for phase in phases:
        masked = {p - 1: h.clients[p].mask_vector(phase, vectors[phase][p - 1]) for p in h.clients}
        if tamper is not None:
            masked = tamper(phase, masked)
        length, dtype = vectors[phase][0].size, vectors[phase][0].dtype.type
        for org, v in masked.items():
            h.server.add_masked(phase, org + 1, v, length, dtype)
        out[phase] = h.server.finish(phase, h.check_and_unmask(phase), length, dtype)
    return out


@pytest.fixture(params=["modular", "protocol"])
def secure_sum(request) -> Callable[..., dict[str, np.ndarray]]:
    """Sum vectors either plainly modulo 2^k or through the real masking protocol."""
    return _modular_sum if request.param == "modular" else _protocol_sum


def _honest_updates(rng: np.random.Generator, n: int = N, rows: int = 30) -> list[RowUpdate]:
    """``n`` updates over SHAPES: random rows, integer weights in [1, max_weight], modest deltas."""
    out = []
    for _ in range(n):
        upd = {}
        for name, (total_rows, dim) in SHAPES.items():
            ids = np.sort(rng.choice(total_rows, size=rows, replace=False)).astype(np.int64)
            delta = rng.normal(0, 0.2, size=(rows, dim)).astype(np.float32)
            upd[name] = TableUpdate(ids, delta, rng.integers(1, 101, size=rows).astype(np.float32))
        out.append(upd)
    return out


def _values(updates: list[RowUpdate], rowset: RowSet, scales: ValueScales = SCALES) -> list[np.ndarray]:
    return [encode_values(u, rowset, SHAPES, scales, "float16")[0] for u in updates]


def _untouched(updates: list[RowUpdate], name: str) -> int:
    """A row of ``name`` no update touched."""
    touched = set(np.concatenate([u[name].ids for u in updates]).tolist())
    return min(set(range(SHAPES[name][0])) - touched)


def _offsets(rowset: RowSet, name: str) -> tuple[int, int]:
    """(start of ``name``'s ``w*delta`` block, start of its weights) in a value vector."""
    offset = 0
    for t in sorted(SHAPES):
        m, dim = rowset[t].size, SHAPES[t][1]
        if t == name:
            return offset, offset + m * dim
        offset += m * (dim + 1)
    raise KeyError(name)


@dataclass(frozen=True)
class _SkipClipScales(ValueScales):
    """The round's quantization grid with a larger ``clip_delta``: an organisation that skips clipping."""

    grid: float = 0.0

    @property
    def data_scale(self) -> float:
        return self.grid


# ---------------------------------------------------------------- attacks
def test_org_skipping_clipping_is_refused(secure_sum):
    rng = np.random.default_rng(0)
    updates = _honest_updates(rng, N - 1)
    # the attacker moves 20 rows per table by 2.5x the clip, at full weight
    attack = {}
    for name, (rows, dim) in SHAPES.items():
        ids = np.sort(rng.choice(rows, size=20, replace=False)).astype(np.int64)
        delta = np.full((20, dim), 2.5 * SCALES.clip_delta, np.float32) * rng.choice([-1, 1], size=(20, dim))
        attack[name] = TableUpdate(ids, delta.astype(np.float32), np.full(20, SCALES.max_weight, np.float32))
    rowset = dense_rowset(SHAPES)
    cheat = _SkipClipScales(
        n=N, clip_delta=2.5 * SCALES.clip_delta, max_weight=SCALES.max_weight, grid=SCALES.data_scale
    )
    bad, clipped = encode_values(attack, rowset, SHAPES, cheat, "float16")
    assert clipped == 0  # nothing clipped: 2.5x the clip went into the vector
    total = secure_sum({"values": _values(updates, rowset) + [bad]})["values"]
    with pytest.raises(UpdateError, match=r"weighted-delta bound .* in table 'items'") as err:
        decode_values(total, rowset, SHAPES, SCALES, delivered=N)
    assert "cannot be identified" in str(err.value)
    # control: the same attacker clipping honestly is accepted
    good = encode_values(attack, rowset, SHAPES, SCALES, "float16")[0]
    total = secure_sum({"values": _values(updates, rowset) + [good]})["values"]
    decode_values(total, rowset, SHAPES, SCALES, delivered=N)


def test_huge_value_on_untouched_row_is_refused(secure_sum):
    rng = np.random.default_rng(1)
    updates = _honest_updates(rng)
    rowset = dense_rowset(SHAPES)
    vectors = _values(updates, rowset)
    row = _untouched(updates, "users")
    start, _ = _offsets(rowset, "users")
    dim = SHAPES["users"][1]
    vectors[0][start + row * dim : start + (row + 1) * dim] = np.uint32(4_290_000_000)  # int32 -4967296
    total = secure_sum({"values": vectors})["values"]
    with pytest.raises(UpdateError, match=r"weighted-delta bound .* in table 'users' at 4 entries"):
        decode_values(total, rowset, SHAPES, SCALES, delivered=N)


@pytest.mark.parametrize("value", ["minus-one", "4.29e9"])
def test_negative_weight_sum_is_refused(secure_sum, value):
    rng = np.random.default_rng(2)
    updates = _honest_updates(rng)
    rowset = dense_rowset(SHAPES)
    vectors = _values(updates, rowset)
    row = _untouched(updates, "items")
    _, weights = _offsets(rowset, "items")
    w = quantize(np.array([-1.0]), SCALES.max_weight, SCALES.weight_scale)[0] if value == "minus-one" else 4_290_000_000
    vectors[0][weights + row] = np.uint32(w)
    total = secure_sum({"values": vectors})["values"]
    with pytest.raises(UpdateError, match=r"weight bound \(sum_w >= 0\) violated in table 'items' at 1 entry"):
        decode_values(total, rowset, SHAPES, SCALES, delivered=N)


def test_weight_sum_above_delivered_times_cap_is_refused(secure_sum):
    # 3 of the round's 4 orgs delivered: a weight sum above 3 x max_weight cannot be honest
    # (with all 4 delivered, a larger sum wraps to negative and the bound above stops it)
    rng = np.random.default_rng(3)
    updates = _honest_updates(rng, N - 1)
    rowset = dense_rowset(SHAPES)
    vectors = _values(updates, rowset)
    row = _untouched(updates, "items")
    _, weights = _offsets(rowset, "items")
    cap = int(quantize(np.array([SCALES.max_weight]), SCALES.max_weight, SCALES.weight_scale)[0])
    vectors[0][weights + row] = np.uint32((N - 1) * cap + int(SCALES.weight_scale))  # one weight unit too many
    total = secure_sum({"values": vectors})["values"]
    bound = r"weight bound \(sum_w <= delivered \* max_weight\) violated in table 'items' at 1 entry"
    with pytest.raises(UpdateError, match=bound):
        decode_values(total, rowset, SHAPES, SCALES, delivered=N - 1)


def test_weight_above_count_times_cap_is_refused_in_union_mode(secure_sum):
    # org 0 alone touches row 7 of "items" at full weight; org 3 (the attacker) did not
    # claim row 7 in its indicators but adds max_weight to it in its value vector
    rng = np.random.default_rng(4)
    updates = _honest_updates(rng)
    for u in updates:
        for name in SHAPES:
            keep = u[name].ids != 7
            u[name] = TableUpdate(u[name].ids[keep], u[name].delta[keep], u[name].weight[keep])
    ids = np.sort(np.append(updates[0]["items"].ids, 7))
    pos = int(np.searchsorted(ids, 7))
    updates[0]["items"] = TableUpdate(
        ids,
        np.insert(updates[0]["items"].delta, pos, 0.5, axis=0),
        np.insert(updates[0]["items"].weight, pos, SCALES.max_weight),
    )
    indicators = [indicator_vector(u, SHAPES, N) for u in updates]
    counts_sum = secure_sum({"indicators": indicators})["indicators"]
    rowset, counts = rowset_from_counts(counts_sum, SHAPES, delivered=N)
    r = int(np.searchsorted(rowset["items"], 7))
    assert rowset["items"][r] == 7 and counts["items"][r] == 1
    vectors = _values(updates, rowset)
    _, weights = _offsets(rowset, "items")
    vectors[3][weights + r] = quantize(np.array([SCALES.max_weight]), SCALES.max_weight, SCALES.weight_scale)[0]
    total = secure_sum({"values": vectors})["values"]
    with pytest.raises(UpdateError, match=r"union weight bound .* in table 'items' at 1 entry .*row 7"):
        decode_values(total, rowset, SHAPES, SCALES, delivered=N, counts=counts)
    # only the union bound sees it: 2 x max_weight is within the global N x max_weight
    assert decode_values(total, rowset, SHAPES, SCALES, delivered=N)["items"].weight[r] == 2 * SCALES.max_weight


@pytest.mark.parametrize("kind", ["cancel", "garbage"])
def test_indicator_sum_above_parties_is_refused(secure_sum, kind):
    rng = np.random.default_rng(5)
    updates = _honest_updates(rng)
    indicators = [indicator_vector(u, SHAPES, N) for u in updates[:-1]]
    dtype = indicator_dtype(N)
    if kind == "cancel":  # -1 on every row: cancels rows one org touched, wraps the untouched ones
        bad = np.full_like(indicators[0], np.iinfo(dtype).max)
    else:
        bad = rng.integers(0, np.iinfo(dtype).max + 1, size=indicators[0].size, dtype=dtype)
    total = secure_sum({"indicators": indicators + [bad]})["indicators"]
    with pytest.raises(UpdateError, match=r"indicator bound .* in table 'items' .* 4 indicator vectors summed") as err:
        rowset_from_counts(total, SHAPES, delivered=N)
    assert "cannot be identified" in str(err.value)


def test_cancel_within_bounds_passes_the_coordinator_and_is_left_to_the_org_side_check():
    # the documented residual: -1 only on a row exactly one org touched removes it from U
    # within bounds; the org that touched it must notice (fedembed.secagg.client)
    rng = np.random.default_rng(6)
    updates = _honest_updates(rng)
    indicators = [indicator_vector(u, SHAPES, N) for u in updates]
    honest = _modular_sum({"indicators": indicators})["indicators"]
    target = int(np.flatnonzero((honest == 1) & (indicators[3] == 0))[0])  # one other org touched it
    indicators[3][target] = np.iinfo(indicators[3].dtype).max  # the attacker's own 0 becomes -1 mod 2^8
    rowset, _ = rowset_from_counts(_modular_sum({"indicators": indicators})["indicators"], SHAPES, delivered=N)
    honest_rowset, _ = rowset_from_counts(honest, SHAPES, delivered=N)
    assert sum(ids.size for ids in rowset.values()) == sum(ids.size for ids in honest_rowset.values()) - 1


@pytest.mark.parametrize("kind", ["all-zero", "replayed"])
@pytest.mark.parametrize("phase", ["values", "indicators"])
def test_garbage_masked_vector_is_refused(kind, phase):
    rng = np.random.default_rng(7)
    updates = _honest_updates(rng)
    rowset = dense_rowset(SHAPES)
    vectors = _values(updates, rowset) if phase == "values" else [indicator_vector(u, SHAPES, N) for u in updates]

    def tamper(ph: str, masked: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        masked[3] = np.zeros_like(masked[3]) if kind == "all-zero" else masked[0].copy()
        return masked

    total = _protocol_sum({phase: vectors}, tamper)[phase]
    # the attacker's masks are left in the sum: uniformly random, out of bounds with
    # overwhelming probability (each weight alone passes with probability about 1/2)
    with pytest.raises(UpdateError, match="secure sum refused: .* cannot be identified"):
        if phase == "values":
            decode_values(total, rowset, SHAPES, SCALES, delivered=N)
        else:
            rowset_from_counts(total, SHAPES, delivered=N)


# ---------------------------------------------------------------- controls: honest sums pass
def _extreme_updates(rng: np.random.Generator, n: int, scales: ValueScales, shared: int = 10) -> list[RowUpdate]:
    """Every org at exactly +-clip_delta (or beyond it, clipped by the encoder) and max_weight.

    The first ``shared`` rows of every table are touched by every org with the same sign (the
    largest honest sums); the rest are random rows, random signs, some fractional weights.
    """
    out = []
    for i in range(n):
        upd = {}
        for name, (rows, dim) in SHAPES.items():
            others = rng.choice(np.arange(shared, rows), size=25, replace=False)
            ids = np.unique(np.concatenate([np.arange(shared), others]))
            sign = rng.choice([-1.0, 1.0], size=(ids.size, dim))
            sign[:shared] = 1.0 if name == "items" else -1.0
            delta = scales.clip_delta * sign * (1.0 + (rng.random((ids.size, dim)) < 0.2))  # some 2x: clipped
            weight = np.full(ids.size, scales.max_weight)
            weight[shared::3] = rng.uniform(1.0, scales.max_weight, size=weight[shared::3].size)
            upd[name] = TableUpdate(ids.astype(np.int64), delta.astype(np.float32), weight.astype(np.float32))
        out.append(upd)
    return out


@pytest.mark.parametrize(
    "n, clip_delta, max_weight, wire_dtype",
    [(2, 1.0, 100.0, "float16"), (4, 0.3, 37.5, "float16"), (7, 4.0, 100.0, "float32"), (200, 0.05, 1000.0, "float16")],
)
def test_honest_extremes_still_pass(secure_sum, n, clip_delta, max_weight, wire_dtype):
    if secure_sum is _protocol_sum and n > 7:
        pytest.skip("200 parties through the protocol: covered by the modular sum")
    rng = np.random.default_rng(n)
    scales = ValueScales(n=n, clip_delta=clip_delta, max_weight=max_weight)
    updates = _extreme_updates(rng, n, scales)
    sums = secure_sum({"indicators": [indicator_vector(u, SHAPES, n) for u in updates]})
    rowset, counts = rowset_from_counts(sums["indicators"], SHAPES, delivered=n)
    assert counts["items"][:10].tolist() == [n] * 10  # every org on the shared rows: count = delivered
    for rs, cts in ((rowset, counts), (dense_rowset(SHAPES), None)):  # union, then dense
        vectors = [encode_values(u, rs, SHAPES, scales, wire_dtype)[0] for u in updates]
        total = secure_sum({"values": vectors})["values"]
        agg = decode_values(total, rs, SHAPES, scales, delivered=n, counts=cts)
        assert np.all(agg["items"].weighted_delta[:10] > 0) and np.all(agg["users"].weighted_delta[:10] < 0)
        assert np.allclose(agg["items"].weight[:10], n * max_weight)
        # the shared rows sit at the very edge of the honest range
        assert np.allclose(agg["items"].mean()[:10], clip_delta, rtol=1e-3)
        assert np.allclose(agg["users"].mean()[:10], -clip_delta, rtol=1e-3)
    # dropouts: n in the scales, fewer vectors delivered
    if n > 2:
        vectors = [encode_values(u, rowset, SHAPES, scales, wire_dtype)[0] for u in updates[:-1]]
        total = _modular_sum({"values": vectors})["values"]
        decode_values(total, rowset, SHAPES, scales, delivered=n - 1, counts=counts)


def test_honest_extremes_pass_the_plain_fixed_point_sum_unchanged():
    rng = np.random.default_rng(11)
    scales = ValueScales(n=5, clip_delta=0.3, max_weight=37.5)
    updates = _extreme_updates(rng, 5, scales)
    agg = fixed_point_sum(updates, SHAPES, scales, "float16")
    ref = sum_updates(
        [
            {
                name: TableUpdate(tu.ids, np.clip(tu.delta.astype(np.float16).astype(np.float64), -0.3, 0.3), tu.weight)
                for name, tu in u.items()
            }
            for u in updates
        ],
        list(SHAPES),
    )
    for name in SHAPES:
        assert np.array_equal(agg[name].ids, ref[name].ids)
        assert np.allclose(agg[name].weight, ref[name].weight, rtol=0, atol=5 / (2 * scales.weight_scale))
        assert np.abs(agg[name].weighted_delta - ref[name].weighted_delta).max() <= scales.bound() + 1e-9


def test_a_zero_sum_has_no_rows_and_passes():
    rowset = dense_rowset(SHAPES)
    total = np.zeros(values_length(rowset, SHAPES), dtype=np.uint32)
    assert decode_values(total, rowset, SHAPES, SCALES, delivered=2) == {}
    with pytest.raises(ValueError, match="delivered"):
        decode_values(total, rowset, SHAPES, SCALES, delivered=N + 1)
