"""The privacy ledger of one organisation: DP-SGD rounds composed with Google's ``dp-accounting``.

Every round an organisation trains with DP it runs ``steps`` steps of a subsampled
Gaussian mechanism: each step samples examples (Poisson with rate ``q``, or a fixed-size
batch drawn uniformly without replacement), clips each example's contribution and adds
Gaussian noise of standard deviation ``noise_multiplier x clip``. The ledger records one
:class:`DPRound` per round and composes them all:

- ``poisson`` sampling, add-or-remove-one neighbouring (the DP-SGD setting of Abadi et
  al. 2016 and of TF Privacy): PLD accountant (tight) or RDP accountant;
- ``uniform`` sampling (fixed batch of ``round(q * population)`` examples without
  replacement), replace-one neighbouring: RDP accountant only (what ``dp-accounting``
  supports for that event).

When a step runs several Gaussian mechanisms on the same sample, each with its own
sensitivity-normalised noise multiplier (the row-sparse path releases noisy row counts and
noisy gradients: :mod:`fedembed.dp.local`), the step is one Gaussian mechanism with the
noise multiplier :func:`effective_noise_multiplier` of them: Gaussian mechanisms compose
exactly (their privacy-loss distributions are Gaussian shifts whose squared means add), so
recording the effective multiplier loses nothing.

**Distributed discrete Gaussian rounds** (:class:`DistributedRound`, organisation-level:
:mod:`fedembed.dp.distributed`) have no event in ``dp-accounting``. Their RDP is the bound
of Kairouz, Liu and Steinke (ICML 2021, Proposition 14) for the sum of ``n`` independent
discrete Gaussians ``N_Z(0, sigma^2)`` shifted by an integer vector of L2 norm ``D2``, L1
norm ``D1`` and dimension ``d``::

    eps(a) = min( a/2 l2^2 + tau d,
                  a/2 (l2^2 + 2 l1 tau + tau^2 d),
                  a/2 (l2 + sqrt(d) tau)^2 )
    l2 = D2 / (sqrt(n) sigma),  l1 = D1 / (sqrt(n) sigma),
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))

(:func:`ddg_rdp`; for one share, ``tau = 0`` and it is the discrete Gaussian's exact
``a D2^2 / (2 sigma^2)``). A ledger holding such rounds composes everything in RDP, at
integer orders (:data:`DDG_ORDERS`), adding the ``dp-accounting`` RDP curve of its DP-SGD
rounds, and converts with ``dp-accounting``'s own RDP-to-DP conversion.

The ledger is plain data (:meth:`PrivacyLedger.to_dict`), torch-free, so the coordinator
side may read an organisation's report of it without importing torch.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: dp-accounting pulls in scipy (0.6 s), and this module is
    # imported by the secure stages of every ClientApp, which must stay a thin forwarder
    import dp_accounting

from fedembed.dp import BudgetExhausted, DPError

log = logging.getLogger(__name__)

SAMPLINGS = ("poisson", "uniform")
METHODS = ("pld", "rdp")


def effective_noise_multiplier(*multipliers: float) -> float:
    """The one Gaussian mechanism equivalent to several run on the same sample.

    Parameters
    ----------
    *multipliers : float
        Each mechanism's noise standard deviation divided by its L2 sensitivity (> 0).

    Returns
    -------
    float
        ``(sum_i multipliers_i ** -2) ** -0.5``.
    """
    if not multipliers or any(not m > 0 for m in multipliers):
        raise DPError(f"noise multipliers must all be > 0, got {multipliers}")
    return float(sum(m**-2.0 for m in multipliers) ** -0.5)


@dataclass(frozen=True)
class DPRound:
    """What one organisation ran in one round: ``steps`` subsampled Gaussian steps.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over L2 sensitivity of one step (the effective one when a
        step runs several mechanisms, :func:`effective_noise_multiplier`).
    sampling_rate : float
        ``q``: each example's probability of being in a step's sample (Poisson), or batch
        size over population (uniform).
    steps : int
        Steps run in the round.
    population : int, optional
        Training examples (needed for ``uniform`` sampling, informative otherwise).
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    population: int | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise DPError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise DPError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if int(self.steps) < 0:
            raise DPError(f"steps must be >= 0, got {self.steps}")


DDG_ORDERS = tuple(range(2, 257)) + (320, 384, 512, 768, 1024)
"""RDP orders of a ledger with distributed rounds (integer: where the DDG bound is stated)."""


@dataclass(frozen=True)
class DistributedRound:
    """One secure sum carrying distributed discrete Gaussian noise, in integer (fixed-point) units.

    Parameters
    ----------
    local_variance : int
        ``sigma^2`` of each organisation's noise share ``N_Z(0, sigma^2)``.
    shares : int
        ``n``: noise shares the sum is guaranteed to hold (more only add noise).
    l2_sensitivity : float
        ``D2``: L2 bound of one organisation's encoded (clipped, scaled, rounded) update.
    l1_sensitivity : float
        ``D1``: its L1 bound.
    dimension : int
        ``d``: entries of the noised vector.
    """

    local_variance: int
    shares: int
    l2_sensitivity: float
    l1_sensitivity: float
    dimension: int

    def __post_init__(self) -> None:
        if not (self.local_variance > 0 and self.shares >= 1 and self.l2_sensitivity > 0
                and self.l1_sensitivity > 0 and self.dimension >= 1):
            raise DPError(f"a distributed round needs positive variance, shares, sensitivities and dimension: {self}")

    @property
    def noise_multiplier(self) -> float:
        """Standard deviation of the guaranteed noise over the L2 sensitivity: ``sqrt(n sigma^2) / D2``."""
        return math.sqrt(self.shares * self.local_variance) / self.l2_sensitivity

    def tau(self) -> float:
        """Kairouz et al.'s ``tau``: how far a sum of ``n`` discrete Gaussians is from one."""
        s2 = float(self.local_variance)
        return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, self.shares))


def ddg_rdp(r: DistributedRound, order: float) -> float:
    """RDP at ``order`` (> 1) of one distributed discrete Gaussian round (module docstring formula).

    Parameters
    ----------
    r : DistributedRound
        The round.
    order : float
        The Renyi order alpha.
    """
    if not order > 1:
        raise DPError(f"RDP orders must be > 1, got {order}")
    sd = math.sqrt(r.shares * r.local_variance)
    l2, l1, tau, d = r.l2_sensitivity / sd, r.l1_sensitivity / sd, r.tau(), float(r.dimension)
    return min(order / 2 * l2**2 + tau * d,
               order / 2 * (l2**2 + 2 * l1 * tau + tau**2 * d),
               order / 2 * (l2 + math.sqrt(d) * tau) ** 2)


@dataclass
class PrivacyLedger:
    """One organisation's DP rounds so far, their composed (epsilon, delta), and its budget.

    Parameters
    ----------
    target_delta : float
        The delta every epsilon is reported at (rule of thumb: below 1 / training examples).
    target_epsilon : float, optional
        The budget: no round may start that would take epsilon past it. None: unlimited.
    sampling : str
        ``poisson`` (add-or-remove-one neighbours) or ``uniform`` (fixed-size batches
        without replacement, replace-one neighbours, RDP only).
    method : str
        ``pld`` (privacy loss distributions, tight; ``poisson`` only) or ``rdp``.
    rounds : list[DPRound]
        The DP-SGD rounds recorded so far (record-level).
    distributed : list[DistributedRound]
        The distributed-noise rounds recorded so far (organisation-level, RDP only).

    Examples
    --------
    >>> ledger = PrivacyLedger(target_delta=1e-5, target_epsilon=3.0)
    >>> ledger.record(DPRound(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=234))
    >>> round(ledger.epsilon(), 2) < 3.0
    True
    """

    target_delta: float
    target_epsilon: float | None = None
    sampling: str = "poisson"
    method: str = "pld"
    rounds: list[DPRound] = field(default_factory=list)
    distributed: list[DistributedRound] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise DPError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.method not in METHODS:
            raise DPError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.sampling == "uniform" and self.method != "rdp":
            raise DPError("uniform (without replacement) sampling is accounted with rdp only")
        if not 0 < self.target_delta < 1:
            raise DPError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise DPError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        self.rounds = [r if isinstance(r, DPRound) else DPRound(**r) for r in self.rounds]
        self.distributed = [r if isinstance(r, DistributedRound) else DistributedRound(**r) for r in self.distributed]

    # ------------------------------------------------------------------ events

    def _step_event(self, r: DPRound) -> dp_accounting.DpEvent:
        import dp_accounting

        gaussian = dp_accounting.GaussianDpEvent(r.noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(r.sampling_rate, gaussian)
        if r.population is None:
            raise DPError("uniform sampling needs the population (training examples) of every round")
        batch = max(1, round(r.sampling_rate * r.population))
        return dp_accounting.SampledWithoutReplacementDpEvent(int(r.population), int(batch), gaussian)

    def event(self, extra: Iterable[DPRound] = ()) -> dp_accounting.DpEvent:
        """The ``dp-accounting`` event of every recorded round (and of ``extra``), composed."""
        return self._event_of(_steps([*self.rounds, *extra]))

    def _event_of(self, steps: tuple[tuple[tuple[float, float, int | None], int], ...]) -> dp_accounting.DpEvent:
        import dp_accounting

        parts = [dp_accounting.SelfComposedDpEvent(self._step_event(DPRound(sigma, q, n, population)), n)
                 for (sigma, q, population), n in steps if n]
        return dp_accounting.ComposedDpEvent(parts)

    def _relation(self) -> dp_accounting.NeighboringRelation:
        import dp_accounting

        return (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                else dp_accounting.NeighboringRelation.REPLACE_ONE)

    def _accountant(self) -> dp_accounting.PrivacyAccountant:
        from dp_accounting import pld, rdp

        if self.method == "pld":
            return pld.PLDAccountant(self._relation())
        return rdp.RdpAccountant(neighboring_relation=self._relation())

    # ------------------------------------------------------------------ queries

    def epsilon(self, delta: float | None = None, extra: Iterable[DPRound | DistributedRound] = ()) -> float:
        """Epsilon of all recorded rounds (plus ``extra``) at ``delta`` (default: the target delta).

        Memoised on what it depends on (the rounds' parameters, not their order): a budget
        check and the report after the round it allowed ask the same question, and so do
        organisations of equal size in one process (a PLD composition costs seconds).
        """
        extra = list(extra)
        steps = _steps([*self.rounds, *(r for r in extra if isinstance(r, DPRound))])
        ddg: dict[DistributedRound, int] = {}
        for r in [*self.distributed, *(r for r in extra if isinstance(r, DistributedRound))]:
            ddg[r] = ddg.get(r, 0) + 1
        delta = self.target_delta if delta is None else float(delta)
        return _composed_epsilon(self.sampling, self.method, steps, tuple(sorted(ddg.items(), key=repr)), delta)

    def spent(self) -> tuple[float, float]:
        """``(epsilon, delta)`` spent so far, at the target delta."""
        return self.epsilon(), float(self.target_delta)

    def would_exceed(self, next_round: DPRound | DistributedRound) -> bool:
        """Whether recording ``next_round`` would take epsilon past the budget (never, without one)."""
        if self.target_epsilon is None:
            return False
        return self.epsilon(extra=[next_round]) > self.target_epsilon

    def check_next(self, next_round: DPRound | DistributedRound) -> None:
        """Raise :class:`~fedembed.dp.BudgetExhausted` if ``next_round`` would exceed the budget."""
        if self.would_exceed(next_round):
            eps_now, eps_next = self.epsilon(), self.epsilon(extra=[next_round])
            if isinstance(next_round, DPRound):
                what = (f"{next_round.steps} steps, noise multiplier {next_round.noise_multiplier:g}, sampling rate "
                        f"{next_round.sampling_rate:.4g}")
            else:
                what = f"distributed noise multiplier {next_round.noise_multiplier:.4g} over {next_round.shares} shares"
            raise BudgetExhausted(
                f"privacy budget: {len(self.rounds) + len(self.distributed)} DP rounds spent epsilon {eps_now:.3f} "
                f"at delta {self.target_delta:g}; one more round ({what}) would reach "
                f"{eps_next:.3f} > target {self.target_epsilon:g}; this organisation stops training"
            )

    def record(self, r: DPRound | DistributedRound) -> None:
        """Append a round that ran."""
        (self.distributed if isinstance(r, DistributedRound) else self.rounds).append(r)

    def resume(self, saved: Mapping[str, Any] | None) -> PrivacyLedger:
        """Take over the rounds of a ledger saved with :meth:`to_dict` (its budget and delta stay this one's)."""
        if saved:
            old = PrivacyLedger.from_dict(saved)
            self.rounds, self.distributed = old.rounds, old.distributed
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable) for the organisation's private state."""
        return {"target_delta": self.target_delta, "target_epsilon": self.target_epsilon, "sampling": self.sampling,
                "method": self.method, "rounds": [asdict(r) for r in self.rounds],
                "distributed": [asdict(r) for r in self.distributed]}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`."""
        return PrivacyLedger(float(d["target_delta"]), d.get("target_epsilon"), str(d.get("sampling", "poisson")),
                             str(d.get("method", "pld")), [DPRound(**r) for r in d.get("rounds", [])],
                             [DistributedRound(**r) for r in d.get("distributed", [])])


def _steps(rounds: Iterable[DPRound]) -> tuple[tuple[tuple[float, float, int | None], int], ...]:
    """Steps per (noise multiplier, sampling rate, population): rounds of one mechanism compose as one run."""
    steps: dict[tuple[float, float, int | None], int] = {}
    for r in rounds:
        key = (float(r.noise_multiplier), float(r.sampling_rate), r.population)
        steps[key] = steps.get(key, 0) + int(r.steps)
    return tuple(sorted(steps.items(), key=repr))


@functools.lru_cache(maxsize=512)
def _composed_epsilon(sampling: str, method: str, steps: tuple, ddg: tuple, delta: float) -> float:
    """Epsilon of DP-SGD ``steps`` and distributed rounds ``ddg`` (each with its count) at ``delta``."""
    from dp_accounting import rdp
    from dp_accounting.rdp import rdp_privacy_accountant

    ledger = PrivacyLedger(delta, sampling=sampling, method=method)
    event = ledger._event_of(steps)
    if ddg:  # no dp-accounting event for them: everything in RDP
        acc = rdp.RdpAccountant(DDG_ORDERS, ledger._relation())
        acc.compose(event)
        curve = [float(v) + sum(count * ddg_rdp(r, a) for r, count in ddg) for a, v in zip(DDG_ORDERS, acc._rdp)]
        return float(rdp_privacy_accountant.compute_epsilon(DDG_ORDERS, curve, delta)[0])
    if not event.events:
        return 0.0
    acc = ledger._accountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def classic_rdp_epsilon(orders: Iterable[float], rdp_values: Iterable[float], delta: float) -> float:
    """Epsilon from RDP by Mironov's conversion ``min_a rdp(a) + log(1/delta) / (a - 1)``.

    The conversion TF Privacy used when it published its tutorial numbers; ``dp-accounting``
    now applies a tighter one (Canonne, Kamath, Steinke 2020, Prop. 12), which gives smaller
    epsilons for the same RDP curve. Kept to compare with published values.
    """
    return float(min(r + math.log(1 / delta) / (a - 1) for a, r in zip(orders, rdp_values) if a > 1))
