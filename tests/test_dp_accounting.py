"""The privacy ledger: published numbers reproduced, independent computations agree, the budget holds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import rdp

from fedembed.dp import BudgetExhausted, DPError
from fedembed.dp.accounting import DPRound, PrivacyLedger, classic_rdp_epsilon, effective_noise_multiplier

# TF Privacy's tutorial orders (tutorials/mnist_dpsgd_tutorial.py, compute_epsilon).
TF_PRIVACY_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize(("sigma", "epochs", "published"), [(1.12, 60, 2.92), (1.2, 10, 1.20)])
def test_reproduces_the_tf_privacy_mnist_tutorial_table(sigma, epochs, published):
    """tensorflow/privacy tutorials/README.md, "Select Parameters": MNIST, 60,000 examples,
    batch (microbatches) 256, delta 1e-5; steps = epochs * 60000 // 256. Those epsilons were
    converted from RDP with Mironov's classic bound, at TF Privacy's orders."""
    ledger = PrivacyLedger(target_delta=1e-5, method="rdp")
    ledger.record(DPRound(noise_multiplier=sigma, sampling_rate=256 / 60000, steps=epochs * 60000 // 256))
    acc = rdp.RdpAccountant(TF_PRIVACY_ORDERS)
    acc.compose(ledger.event())
    assert round(classic_rdp_epsilon(acc.orders, acc.rdp, 1e-5), 2) == published
    # what the ledger reports is tighter (newer RDP->DP conversion; PLD tighter still), never looser
    assert ledger.epsilon() < published
    assert PrivacyLedger(1e-5, rounds=ledger.rounds).epsilon() < ledger.epsilon()


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _independent_rdp(q: float, sigma: float, steps: int, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order alpha (Mironov, Talwar, Zhang 2019, Thm. 11),
    summed in log space here, from scratch: no dp-accounting code."""
    terms = [_log_binom(alpha, k) + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
             for k in range(alpha + 1)]
    m = max(terms)
    return steps * (m + math.log(sum(math.exp(t - m) for t in terms))) / (alpha - 1)


def _cks_epsilon(rdp_value: float, alpha: int, delta: float) -> float:
    """Canonne, Kamath, Steinke 2020, Prop. 12."""
    return rdp_value + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 256 / 60000, 14062), (0.8, 0.01, 500), (2.0, 0.05, 2000)])
def test_rdp_epsilon_matches_an_independent_computation(sigma, q, steps):
    ledger = PrivacyLedger(target_delta=1e-5, method="rdp")
    ledger.record(DPRound(sigma, q, steps))
    independent = min(_cks_epsilon(_independent_rdp(q, sigma, steps, a), a, 1e-5) for a in range(2, 257))
    # the ledger also tries fractional orders, so it may only be (slightly) lower
    assert ledger.epsilon() <= independent + 1e-9
    assert ledger.epsilon() == pytest.approx(independent, rel=0.03)


def _exact_gaussian_delta(mu: float, eps: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018, Thm. 8)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


@pytest.mark.parametrize(("sigma", "steps"), [(5.0, 10), (20.0, 100), (2.0, 1)])
def test_pld_without_sampling_matches_the_exact_gaussian(sigma, steps):
    """With q = 1, ``steps`` Gaussian steps are one Gaussian mechanism with mu = sqrt(steps) / sigma,
    whose delta(eps) is known in closed form: the PLD ledger's epsilon must solve it."""
    ledger = PrivacyLedger(target_delta=1e-5)
    ledger.record(DPRound(sigma, 1.0, steps))
    mu = math.sqrt(steps) / sigma
    lo, hi = 0.0, 100.0
    for _ in range(200):  # bisection: delta(eps) decreases in eps
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _exact_gaussian_delta(mu, mid) > 1e-5 else (lo, mid)
    assert ledger.epsilon() == pytest.approx(hi, abs=2e-3)
    assert ledger.epsilon() >= hi - 1e-4  # PLD discretisation is pessimistic, never optimistic


def test_rounds_compose_as_one_run_of_all_their_steps():
    one = PrivacyLedger(1e-5)
    one.record(DPRound(1.0, 0.02, 300))
    split = PrivacyLedger(1e-5)
    for _ in range(3):
        split.record(DPRound(1.0, 0.02, 100))
    assert split.epsilon() == pytest.approx(one.epsilon(), rel=1e-6)
    assert split.epsilon() > PrivacyLedger(1e-5, rounds=split.rounds[:2]).epsilon()


def test_budget_refuses_the_round_that_would_exceed_it():
    r = DPRound(1.0, 0.02, 100)
    ledger = PrivacyLedger(1e-5, target_epsilon=2.0, method="rdp")  # rdp: fast enough to query every round
    ran = 0
    while not ledger.would_exceed(r):
        ledger.check_next(r)
        ledger.record(r)
        ran += 1
    assert ran > 0 and ledger.epsilon() <= 2.0 < ledger.epsilon(extra=[r])
    with pytest.raises(BudgetExhausted, match="would reach"):
        ledger.check_next(r)
    assert not PrivacyLedger(1e-5).would_exceed(DPRound(0.1, 1.0, 10**6))  # no budget, no limit


def test_uniform_sampling_is_accounted_with_rdp_and_the_population():
    with pytest.raises(DPError):
        PrivacyLedger(1e-5, sampling="uniform", method="pld")
    ledger = PrivacyLedger(1e-5, sampling="uniform", method="rdp")
    ledger.record(DPRound(1.1, 256 / 60000, 1000, population=60000))
    assert 0 < ledger.epsilon() < np.inf
    with pytest.raises(DPError, match="population"):
        PrivacyLedger(1e-5, sampling="uniform", method="rdp", rounds=[DPRound(1.1, 0.01, 10)]).epsilon()


def test_the_ledger_survives_a_round_trip_through_plain_data():
    import json

    ledger = PrivacyLedger(1e-6, target_epsilon=8.0, method="rdp", rounds=[DPRound(1.3, 0.01, 50, population=1600)])
    again = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again == ledger and again.epsilon() == ledger.epsilon()


def test_effective_noise_multiplier_of_two_mechanisms():
    assert effective_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert effective_noise_multiplier(3.0) == 3.0
    with pytest.raises(DPError):
        effective_noise_multiplier(1.0, 0.0)
    # two mechanisms on one sample cost exactly what the single effective one costs
    two = PrivacyLedger(1e-5, rounds=[DPRound(effective_noise_multiplier(2.0, 1.5), 1.0, 1)])
    mu = math.sqrt(2.0**-2 + 1.5**-2)
    assert _exact_gaussian_delta(mu, two.epsilon()) == pytest.approx(1e-5, rel=0.05)
