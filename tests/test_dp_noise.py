"""The randomness DP releases: a secret ChaCha20 stream, exact discrete Gaussians, keys nobody else holds."""

from __future__ import annotations

import math
import stat
import time

import numpy as np
import pytest

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.dp import DPError
from fedembed.dp.noise import NOISE_KEY_FILE, SecureRandom, discrete_gaussian_variance, noise_secret
from fedembed.org import handle_content
from fedembed.recipe import TrainConfig
from fedembed.secagg.primitives import KeyStream, keystream
from fedembed.task import TaskSpec
from fedembed.wire import decode_update

KEY = bytes(range(32))


def test_the_keystream_reads_on_where_it_stopped_and_is_chacha20():
    ks = KeyStream(KEY)
    parts = ks.read(5) + ks.read(60) + ks.read(1000)
    assert parts == keystream(KEY, 1065, np.uint8).tobytes()


def test_a_release_repeats_under_its_key_and_no_other():
    secret = noise_secret(None, seed="s")
    a = SecureRandom.derive(secret, "record", "run", 1).words(8)
    assert np.array_equal(a, SecureRandom.derive(secret, "record", "run", 1).words(8))
    for other in (SecureRandom.derive(secret, "record", "run", 2), SecureRandom.derive(secret, "distributed", "run", 1),
                  SecureRandom.derive(noise_secret(None, seed="t"), "record", "run", 1)):
        assert not np.array_equal(a, other.words(8))


def test_an_organisations_noise_key_is_made_once_private_and_kept(tmp_path):
    first = noise_secret(tmp_path)
    path = tmp_path / NOISE_KEY_FILE
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert noise_secret(tmp_path) == first  # a restarted round draws the same noise, not fresh noise
    assert noise_secret(tmp_path, seed="x") != first
    path.write_bytes(b"short")
    with pytest.raises(DPError, match="remove it"):
        noise_secret(tmp_path)
    with pytest.raises(DPError, match="state directory"):
        noise_secret(None)


def _dg_pmf(s: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(-radius, radius + 1)
    w = np.exp(-(k.astype(float) ** 2) / (2 * s))
    return k, w / w.sum()


@pytest.mark.parametrize("variance", [0.4, 3, 30])
def test_the_discrete_gaussian_follows_its_exact_pmf(variance):
    s, t = discrete_gaussian_variance(variance)
    assert s >= variance and s % t == 0 and t == math.isqrt(s) + 1
    n = 200_000
    x = SecureRandom.derive(KEY, "dg", variance).discrete_gaussian(s, n)
    assert x.dtype == np.int64
    k, p = _dg_pmf(s, int(12 * math.sqrt(s)) + 3)
    counts = np.array([np.count_nonzero(x == v) for v in k])
    assert counts.sum() == n  # nothing outside 12 sigma
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.01, tv
    big = p * n > 20  # chi-square over the well-populated cells (a wrong law fails it by orders of magnitude)
    chi2 = float((((counts - p * n) ** 2) / (p * n))[big].sum())
    assert chi2 < big.sum() + 6 * math.sqrt(2 * big.sum()), (chi2, big.sum())


def test_a_large_variance_discrete_gaussian_has_the_right_moments():
    s, _ = discrete_gaussian_variance(3.7e13)  # the size of a distributed DP share (2^20 units, sigma ~ 6)
    x = SecureRandom.derive(KEY, "big").discrete_gaussian(s, 100_000).astype(np.float64)
    sd = math.sqrt(s)
    assert abs(x.mean()) / sd < 0.02
    assert x.var() / s == pytest.approx(1.0, abs=0.02)
    assert np.mean(np.abs(x) <= sd) == pytest.approx(0.6827, abs=0.01)


def test_bernoulli_exp_is_exact_for_fractions_below_and_above_one():
    r = SecureRandom.derive(KEY, "bern")
    for a, b in ((1, 3), (5, 2), (7, 7), (0, 5)):
        draws = r._bernoulli_exp(np.full(100_000, a, dtype=np.int64), b)
        assert draws.mean() == pytest.approx(math.exp(-a / b), abs=0.006), (a, b)
    hits = [r._bernoulli_exp_big(5 * 10**30, 2 * 10**30) for _ in range(4000)]  # the overflow path
    assert np.mean(hits) == pytest.approx(math.exp(-2.5), abs=0.02)


def test_uniform_integers_have_no_modulo_bias():
    r = SecureRandom.derive(KEY, "below")
    bound = 3 * 2**61  # 2^64 mod bound = 2^62: plain modulo would give [0, 2^61) 3/8, not 1/3
    x = r.below(bound, size=60_000)
    assert np.mean(x < 2**61) == pytest.approx(1 / 3, abs=0.01)
    assert set(np.unique(r.below(np.array([1, 2, 3] * 1000))).tolist()) <= {0, 1, 2}
    with pytest.raises(DPError):
        r.below(0, size=3)


def test_the_generator_stand_ins_draw_what_numpy_would():
    r = SecureRandom.derive(KEY, "numpy")
    z = r.normal(0.0, 2.0, size=200_000)
    assert z.mean() == pytest.approx(0.0, abs=0.02) and z.std() == pytest.approx(2.0, rel=0.01)
    u = r.random(100_000)
    assert 0 <= u.min() and u.max() < 1 and u.mean() == pytest.approx(0.5, abs=0.005)
    picks = r.choice(np.arange(50), size=20)
    assert len(set(picks.tolist())) == 20
    assert np.mean([r.binomial(1000, 0.01) for _ in range(3000)]) == pytest.approx(10.0, abs=0.3)


def test_a_million_discrete_gaussians_take_seconds_not_minutes():
    s, _ = discrete_gaussian_variance(1e12)
    t0 = time.perf_counter()
    SecureRandom.derive(KEY, "speed").discrete_gaussian(s, 200_000)
    assert time.perf_counter() - t0 < 15.0  # ~0.5 s on an idle core; 10^6 values ~2 s


def test_the_sampler_refuses_a_variance_it_cannot_draw_exactly():
    r = SecureRandom.derive(KEY, "refuse")
    with pytest.raises(DPError, match="discrete_gaussian_variance"):
        r.discrete_gaussian(10, 5)  # t = 4 does not divide 10
    for bad in (0, -1, 2.0**61, float("nan")):
        with pytest.raises(DPError):
            discrete_gaussian_variance(bad)


TASK = TaskSpec("synthetic", {"orgs": 2, "rows": 2000, "examples": 300, "dim": 8, "hidden": 16})
DP = dict(dp_noise_multiplier=1.0, dp_clip=1.0, dp_selection_noise_multiplier=0.5, dp_row_threshold=5.0,
          dp_count_clip=3.0, keep_table_state=False, batch_size=16, max_row_weight=3)


def _update(direct_transport, root, seed):
    t = direct_transport(root, 2, task=TASK)
    t.orgs[100].noise_seed = seed
    c = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**DP)), t)
    reply = handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "ok"
    return decode_update(reply["update"], c.shapes, max_weight=3)["ids"]


def test_record_level_noise_follows_the_organisations_secret_not_the_run_seed(tmp_path, direct_transport):
    """Same run seed, same data: the released update differs with the organisation's noise secret alone, so
    the coordinator (which chose the run seed) cannot regenerate it; the same secret repeats it."""
    a = _update(direct_transport, tmp_path / "a", None)  # each its own random key file
    b = _update(direct_transport, tmp_path / "b", None)
    assert not (np.array_equal(a.ids, b.ids) and np.array_equal(a.delta, b.delta))
    c = _update(direct_transport, tmp_path / "c", "fixed")
    d = _update(direct_transport, tmp_path / "d", "fixed")
    assert np.array_equal(c.ids, d.ids) and np.array_equal(c.delta, d.delta)
