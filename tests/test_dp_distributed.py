"""Organisation-level distributed DP over secure aggregation: the discrete Gaussian shares, their accounting,
the fixed point that cannot wrap, dropouts, and the modes it is refused in."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, rdp
from scipy.special import logsumexp

from conftest import run_config
from fedembed.config import ConfigError
from fedembed.coordinator import Coordinator
from fedembed.dp import DPError
from fedembed.dp.accounting import DDG_ORDERS, DistributedRound, PrivacyLedger, ddg_rdp
from fedembed.dp.distributed import SENSITIVITY_QUANTA, DistributedNoise
from fedembed.dp.noise import SecureRandom
from fedembed.dp.policy import DPPolicy
from fedembed.org import handle_content
from fedembed.recipe import RecipeError, TrainConfig
from fedembed.secagg.client import begin
from fedembed.secagg.protocol import ProtocolError
from fedembed.secagg.vector import ValueScales, decode_values, dense_rowset, encode_values
from fedembed.sparse import TableUpdate, UpdateError
from fedembed.task import TaskSpec
from secagg_harness import Harness

# ---------------------------------------------------------------------------- the accountant


def _sum_of_discrete_gaussians(s2: float, shares: int, radius: int = 200) -> np.ndarray:
    k = np.arange(-radius, radius + 1)
    p = np.exp(-(k**2) / (2 * s2))
    p /= p.sum()
    q = p
    for _ in range(shares - 1):
        q = np.convolve(q, p)
    return q


def _exact_renyi(p: np.ndarray, q: np.ndarray, order: float) -> float:
    m = (p > 0) & (q > 0)
    return float(logsumexp(order * np.log(p[m]) + (1 - order) * np.log(q[m])) / (order - 1))


@pytest.mark.parametrize("s2", [0.09, 0.25, 0.49, 1.0])
@pytest.mark.parametrize("shares", [1, 2, 3, 5])
def test_the_ddg_bound_holds_the_exact_renyi_divergence_of_a_sum_of_discrete_gaussians(s2, shares):
    """Independent computation: the law of a sum of discrete Gaussians by convolution, its Renyi divergence
    against itself shifted, at every order and shift: never above Kairouz et al.'s Proposition 14."""
    q = _sum_of_discrete_gaussians(s2, shares)
    for shift in (1, 2, 3):
        p = np.roll(q, shift)
        r = DistributedRound(1, shares, float(shift), float(shift), 1)
        object.__setattr__(r, "local_variance", s2)  # a fractional sigma^2, where tau is large
        for order in (2, 5, 20):
            assert _exact_renyi(p, q, order) <= ddg_rdp(r, order) + 1e-9


def test_the_tau_term_is_needed_for_small_shares():
    """Without it the bound would fail: three shares of variance 0.09 are far from one discrete Gaussian."""
    q = _sum_of_discrete_gaussians(0.09, 3)
    exact = _exact_renyi(np.roll(q, 1), q, 2)
    gaussian_only = 2 / 2 * 1 / (3 * 0.09)
    assert exact > 1.15 * gaussian_only


@pytest.mark.parametrize(("s2", "shift", "order"), [(4, 1, 2), (9, 2, 3), (25, 3, 7)])
def test_one_share_is_the_discrete_gaussians_exact_value(s2, shift, order):
    """With one share tau = 0 and the bound is alpha D^2 / (2 sigma^2), which is exact at integer shift and order."""
    r = DistributedRound(s2, 1, float(shift), float(shift), 1)
    assert r.tau() == 0.0
    assert ddg_rdp(r, order) == pytest.approx(order * shift**2 / (2 * s2))
    q = _sum_of_discrete_gaussians(s2, 1)
    assert _exact_renyi(np.roll(q, shift), q, order) == pytest.approx(ddg_rdp(r, order), rel=1e-9)


def test_distributed_rounds_compose_like_the_gaussian_they_approach():
    """At fixed-point scale tau vanishes and the DDG round is the Gaussian mechanism of its noise multiplier:
    T rounds in the ledger give dp-accounting's own RDP epsilon of T Gaussian mechanisms at the same orders."""
    noise = DistributedNoise(noise_multiplier=1.3, clip=0.5, shares=3, max_weight=1.0, clip_delta=4.0, entries=320_000)
    r = noise.round()
    assert r.tau() == 0.0 and 1.3 <= r.noise_multiplier <= 1.3 * (1 + 1e-5)  # rounded up: never less noise
    ledger = PrivacyLedger(1e-5)
    for _ in range(10):
        ledger.record(r)
    acc = rdp.RdpAccountant(DDG_ORDERS)
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(r.noise_multiplier), 10))
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert ledger.epsilon() > PrivacyLedger(1e-5, distributed=ledger.distributed[:9]).epsilon()
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again == ledger and again.epsilon() == ledger.epsilon()


def test_a_budget_stops_the_round_that_would_exceed_it():
    r = DistributedNoise(2.0, 1.0, 2, 1.0, 4.0, 1000).round()
    ledger = PrivacyLedger(1e-5, target_epsilon=3.0)
    while not ledger.would_exceed(r):
        ledger.record(r)
    assert 0 < len(ledger.distributed) and ledger.epsilon() <= 3.0
    with pytest.raises(Exception, match="distributed noise multiplier"):
        ledger.check_next(r)


# ---------------------------------------------------------------------------- encoding, noise, sums

SHAPES = {"a": (300, 8), "b": (200, 4)}
ROWSET = dense_rowset(SHAPES)


def _noise(sigma=1.0, clip=0.5, shares=3, weight=2.0, delta_clip=4.0) -> DistributedNoise:
    return DistributedNoise(sigma, clip, shares, weight, delta_clip, sum(r * d for r, d in SHAPES.values()))


def _update(seed: int, scale: float = 0.05) -> dict[str, TableUpdate]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (rows, dim) in SHAPES.items():
        ids = np.unique(rng.integers(0, rows, size=rows // 4)).astype(np.int64)
        out[name] = TableUpdate(ids, (rng.normal(0, scale, (ids.size, dim))).astype(np.float32),
                                np.ones(ids.size, np.float32))
    return out


def _encode(update, noise: DistributedNoise, n: int, key: int) -> np.ndarray:
    scales = ValueScales(n=n, clip_delta=noise.clip_delta, max_weight=noise.max_weight, noise=noise)
    vec, _ = encode_values(update, ROWSET, SHAPES, scales, "float32", SecureRandom.derive(bytes(32), "t", key))
    return vec


def _signal(vec: np.ndarray, zero: np.ndarray, noise: DistributedNoise) -> np.ndarray:
    """The encoded update without its noise (the same key draws the same noise), data entries only, int64."""
    data = np.concatenate([((vec - zero).view(np.int32)[o : o + r * d]).astype(np.int64)
                           for o, (r, d) in zip(_offsets(), SHAPES.values())])
    return data


def _offsets() -> list[int]:
    out, o = [], 0
    for name in sorted(SHAPES):
        out.append(o)
        o += SHAPES[name][0] * (SHAPES[name][1] + 1)
    return out


def test_an_organisations_update_is_clipped_to_the_sensitivity_the_accountant_counts():
    noise = _noise()
    huge = {k: TableUpdate(u.ids, u.delta * 1e4, u.weight) for k, u in _update(0).items()}
    zero = _encode({}, noise, 3, key=7)
    for upd, clipped in ((huge, True), (_update(1, scale=1e-4), False)):
        v = _signal(_encode(upd, noise, 3, key=7), zero, noise)
        norm = float(np.linalg.norm(v))
        assert norm <= noise.l2_sensitivity and float(np.abs(v).sum()) <= noise.l1_sensitivity
        if clipped:
            assert norm == pytest.approx(SENSITIVITY_QUANTA, rel=1e-3)
        else:
            assert norm < 0.01 * SENSITIVITY_QUANTA


def test_each_share_holds_a_part_and_the_sum_the_noise_the_accountant_was_told():
    """The empirical check: the released sum's noise std over 3 shares against what the ledger records."""
    noise = _noise(sigma=1.5, shares=3)
    n = 3
    vectors = [_encode({}, noise, n, key=p) for p in range(n)]  # zero updates: what is left is noise
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    scales = ValueScales(n=n, clip_delta=noise.clip_delta, max_weight=noise.max_weight, noise=noise)
    agg = decode_values(total, ROWSET, SHAPES, scales, delivered=n)
    released = np.concatenate([agg[t].weighted_delta.ravel() for t in sorted(SHAPES)])
    r = noise.round()  # what the ledger records: sqrt(m S) / D2 = sigma, in units of the clipped W * delta
    told = r.noise_multiplier * r.l2_sensitivity / noise.scale
    assert told == pytest.approx(1.5 * noise.max_weight * noise.clip, rel=1e-3)
    assert released.std() == pytest.approx(told, rel=0.02)
    assert released.mean() == pytest.approx(0.0, abs=0.02 * told)
    own = np.concatenate([_signal(vectors[0], np.zeros_like(vectors[0]), noise)]) / noise.scale
    assert own.std() == pytest.approx(told / math.sqrt(3), rel=0.02)  # no organisation's vector holds all of it
    for t in SHAPES:
        assert np.all(agg[t].weight == n * noise.max_weight)


def test_the_secure_sum_with_noise_equals_the_plain_sum_of_the_same_noisy_vectors():
    """DP + secure = DP + plain where the noise is added the same way: each party's noisy vector, summed in the
    clear and through the protocol (a dropout before masking included), decodes to the very same sums."""
    noise = _noise(shares=2)
    n = 5
    updates = {p: _update(p) for p in range(1, n + 1)}
    vectors = {p: _encode(updates[p], noise, n, key=p) for p in updates}
    scales = ValueScales(n=n, clip_delta=noise.clip_delta, max_weight=noise.max_weight, noise=noise)
    for dropped in ((), (3,)):
        h = Harness(n)
        h.share()
        for p in h.clients:
            if p not in dropped:
                h.accept(p)
                h.deliver(p, vectors[p])
        secure = h.server.finish("values", h.check_and_unmask(), vectors[1].size, np.uint32)
        plain = np.zeros_like(vectors[1])
        for p, v in vectors.items():
            if p not in dropped:
                plain += v
        assert np.array_equal(secure, plain)
        d = n - len(dropped)
        a, b = decode_values(secure, ROWSET, SHAPES, scales, d), decode_values(plain, ROWSET, SHAPES, scales, d)
        for t in SHAPES:
            assert np.array_equal(a[t].weighted_delta, b[t].weighted_delta) and np.array_equal(a[t].weight, b[t].weight)


def test_the_noisy_sum_is_checked_against_what_honest_organisations_send():
    noise = _noise(shares=2)
    n = 3
    scales = ValueScales(n=n, clip_delta=noise.clip_delta, max_weight=noise.max_weight, noise=noise)
    honest = [_encode(_update(p, scale=1.0), noise, n, key=p) for p in range(n)]
    total = sum(honest[1:], honest[0].copy())
    decode_values(total, ROWSET, SHAPES, scales, n)  # passes
    skipped_clip = total.copy()
    skipped_clip[5] = np.uint32(int(noise.sum_bound(n)) + 1)  # beyond what clip + noise tail allow
    with pytest.raises(UpdateError, match="noisy weighted-delta bound"):
        decode_values(skipped_clip, ROWSET, SHAPES, scales, n)
    weights = total.copy()
    weights[SHAPES["a"][0] * SHAPES["a"][1] + 3] += np.uint32(1)  # a row weighted unlike every other
    with pytest.raises(UpdateError, match="weight bound"):
        decode_values(weights, ROWSET, SHAPES, scales, n)


def test_a_round_that_could_wrap_the_32_bit_sum_is_refused():
    noise = _noise(sigma=20.0, shares=1)
    noise.check_no_wrap(3)
    assert noise.sum_bound(3) < 2**31
    with pytest.raises(DPError, match="wrap"):
        ValueScales(n=200, clip_delta=noise.clip_delta, max_weight=noise.max_weight, noise=noise)
    with pytest.raises(UpdateError, match="dense row set"):  # a row set smaller than the one accounted for
        rows = {k: v[: v.size // 2] for k, v in ROWSET.items()}
        scales = ValueScales(n=3, clip_delta=noise.clip_delta, max_weight=noise.max_weight, noise=noise)
        encode_values({}, rows, SHAPES, scales, "float32", SecureRandom.fresh())


# ---------------------------------------------------------------------------- refusals

TASK = TaskSpec("synthetic", {"orgs": 3, "rows": 2000, "examples": 300, "dim": 8, "hidden": 16})
DDP = dict(dp_sum_noise_multiplier=1.0, dp_update_clip=0.5, dp_noise_shares=2)


@pytest.mark.parametrize(("bad", "named"), [
    ({"dp_sum_noise_multiplier": -1.0}, "dp_sum_noise_multiplier"),
    ({"dp_sum_noise_multiplier": float("nan")}, "dp_sum_noise_multiplier"),
    ({"dp_sum_noise_multiplier": float("inf")}, "dp_sum_noise_multiplier"),
    ({**DDP, "dp_update_clip": 0.0}, "dp_update_clip"), ({**DDP, "dp_noise_shares": 0}, "dp_noise_shares"),
    ({**DDP, "dp_noise_multiplier": 1.0}, "one privacy unit"), ({**DDP, "dp_target_delta": 1.0}, "dp_target_delta"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": float("inf")}, "dp_clip"),
])
def test_a_recipe_with_absurd_dp_parameters_is_refused_by_name(bad, named):
    with pytest.raises(RecipeError, match=named):
        TrainConfig(**bad)


def test_distributed_noise_is_refused_outside_a_secure_dense_round(tmp_path, direct_transport):
    cfg = TrainConfig(**DDP)
    for kw in ({}, {"secure": True, "row_set": "union"}, {"secure": True, "row_set": "revealed"}):
        with pytest.raises(ConfigError, match="--secure --row-set dense"):
            run_config(TASK, train=cfg, **kw)
    with pytest.raises(ConfigError, match="--secure --row-set dense"):
        run_config(TASK, train=cfg, mode="local")
    # an organisation holds the rule itself, whatever a coordinator sends
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1, secure=True, row_set="dense", train=cfg), t)
    msg = c.train_message(100, 1)
    config = dict(msg["config"])
    config["row_set"] = "union"
    msg["config"] = type(msg["config"])(config)
    reply = handle_content(t.orgs[100], msg, "train", 100)
    assert reply["info"]["status"] == "refused" and "dense row set" in reply["info"]["error"]
    noise = DistributedNoise.for_recipe(cfg, c.shapes, 4.0)
    with pytest.raises(ProtocolError, match="released without noise"):
        begin(t.orgs[100].member, "run", 1, "revealed", {}, c.shapes, 4.0, 1.0, "float16", dp_noise=noise)


def test_a_coordinator_asking_for_less_distributed_noise_than_the_floor_is_refused(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    t.orgs[100].dp_policy = DPPolicy(min_noise_multiplier=1.5)
    c = Coordinator(run_config(TASK, rounds=1, secure=True, row_set="dense", train=TrainConfig(**DDP)), t)
    reply = handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "refused"
    assert "dp_sum_noise_multiplier 1.0 is below this organisation's minimum 1.5" in reply["info"]["error"]


# ---------------------------------------------------------------------------- rounds


def _coordinator(root: Path, direct_transport, shares: int, drop: dict | None = None, rounds: int = 2):
    t = direct_transport(root, 3, task=TASK)
    for i, org in enumerate(t.orgs.values()):
        org.noise_seed = f"seed-{i}"
    cfg = run_config(TASK, rounds=rounds, secure=True, row_set="dense", drop=drop or {},
                     train=TrainConfig(**{**DDP, "dp_noise_shares": shares}))
    return Coordinator(cfg, t), t


def test_secure_dense_rounds_with_distributed_noise_are_accounted_per_organisation(tmp_path, direct_transport):
    c, t = _coordinator(tmp_path, direct_transport, shares=2)
    before = c.tables.tables["ids"].copy()
    entries = [c.run_round(r, sorted(t.orgs)) for r in (1, 2)]
    for e in entries:
        assert "abandoned" not in e and e["clients"] == 3
        assert e["secure"]["dp"]["shares"] == 3 and e["secure"]["dp"]["guaranteed_shares"] == 2
        assert e["secure"]["dp"]["noise_std"] == pytest.approx(math.sqrt(3 / 2) * 1.0 * 0.5, rel=1e-3)
    assert np.all(c.tables.tables["ids"] != before)  # noise on every row: nothing tells which rows were used
    eps = [e["privacy"]["org-0"]["epsilon"] for e in entries]
    assert 0 < eps[0] < eps[1]
    ledger = PrivacyLedger.from_dict(t.orgs[100].state.load_head()["dp_ledger"])
    assert len(ledger.distributed) == 2 and not ledger.rounds and ledger.epsilon() == pytest.approx(eps[1])
    # independent: two Gaussian mechanisms of the recorded multiplier, dp-accounting's RDP at the same orders
    acc = rdp.RdpAccountant(DDG_ORDERS)
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(ledger.distributed[0].noise_multiplier), 2))
    assert eps[1] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_a_dropout_leaves_the_shares_that_arrived_and_too_few_are_never_unmasked(tmp_path, direct_transport):
    c, t = _coordinator(tmp_path / "two", direct_transport, shares=2, drop={"masked": [2]}, rounds=1)
    e = c.run_round(1, sorted(t.orgs))
    assert "abandoned" not in e and e["clients"] == 2 and e["secure"]["dp"]["shares"] == 2
    assert e["secure"]["dp"]["noise_multiplier"] == pytest.approx(1.0, rel=1e-3)  # exactly the guaranteed noise
    c, t = _coordinator(tmp_path / "three", direct_transport, shares=3, drop={"masked": [2]}, rounds=1)
    before = c.tables.tables["ids"].copy()
    e = c.run_round(1, sorted(t.orgs))
    assert "abandoned" in e  # 2 vectors carry 2 of the 3 shares counted on: no organisation helps unmask them
    assert any("our policy unmasks sums of at least 3" in why for why in e["rejected"].values())
    assert np.array_equal(c.tables.tables["ids"], before)
