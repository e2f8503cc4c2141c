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

The ledger is plain data (:meth:`PrivacyLedger.to_dict`), torch-free, so the coordinator
side may read an organisation's report of it without importing torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

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
        The rounds recorded so far.

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

    # ------------------------------------------------------------------ events

    def _step_event(self, r: DPRound) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(r.noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(r.sampling_rate, gaussian)
        if r.population is None:
            raise DPError("uniform sampling needs the population (training examples) of every round")
        batch = max(1, round(r.sampling_rate * r.population))
        return dp_accounting.SampledWithoutReplacementDpEvent(int(r.population), int(batch), gaussian)

    def event(self, extra: Iterable[DPRound] = ()) -> dp_accounting.DpEvent:
        """The ``dp-accounting`` event of every recorded round (and of ``extra``), composed."""
        steps: dict[tuple[float, float, int | None], int] = {}
        for r in [*self.rounds, *extra]:  # rounds of one mechanism compose as one run of all their steps (fast in PLD)
            key = (r.noise_multiplier, r.sampling_rate, r.population)
            steps[key] = steps.get(key, 0) + int(r.steps)
        parts = [dp_accounting.SelfComposedDpEvent(self._step_event(DPRound(sigma, q, n, population)), n)
                 for (sigma, q, population), n in steps.items() if n]
        return dp_accounting.ComposedDpEvent(parts)

    def _accountant(self) -> dp_accounting.PrivacyAccountant:
        relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                    else dp_accounting.NeighboringRelation.REPLACE_ONE)
        if self.method == "pld":
            return pld.PLDAccountant(relation)
        return rdp.RdpAccountant(neighboring_relation=relation)

    # ------------------------------------------------------------------ queries

    def epsilon(self, delta: float | None = None, extra: Iterable[DPRound] = ()) -> float:
        """Epsilon of all recorded rounds (plus ``extra``) at ``delta`` (default: the target delta)."""
        event = self.event(extra)
        if not event.events:
            return 0.0
        acc = self._accountant()
        acc.compose(event)
        return float(acc.get_epsilon(self.target_delta if delta is None else float(delta)))

    def spent(self) -> tuple[float, float]:
        """``(epsilon, delta)`` spent so far, at the target delta."""
        return self.epsilon(), float(self.target_delta)

    def would_exceed(self, next_round: DPRound) -> bool:
        """Whether recording ``next_round`` would take epsilon past the budget (never, without one)."""
        if self.target_epsilon is None:
            return False
        return self.epsilon(extra=[next_round]) > self.target_epsilon

    def check_next(self, next_round: DPRound) -> None:
        """Raise :class:`~fedembed.dp.BudgetExhausted` if ``next_round`` would exceed the budget."""
        if self.would_exceed(next_round):
            eps_now, eps_next = self.epsilon(), self.epsilon(extra=[next_round])
            raise BudgetExhausted(
                f"privacy budget: {len(self.rounds)} DP rounds spent epsilon {eps_now:.3f} at delta "
                f"{self.target_delta:g}; one more round ({next_round.steps} steps, noise multiplier "
                f"{next_round.noise_multiplier:g}, sampling rate {next_round.sampling_rate:.4g}) would reach "
                f"{eps_next:.3f} > target {self.target_epsilon:g}; this organisation stops training"
            )

    def record(self, r: DPRound) -> None:
        """Append a round that ran."""
        self.rounds.append(r)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable) for the organisation's private state."""
        return {"target_delta": self.target_delta, "target_epsilon": self.target_epsilon, "sampling": self.sampling,
                "method": self.method, "rounds": [asdict(r) for r in self.rounds]}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`."""
        return PrivacyLedger(float(d["target_delta"]), d.get("target_epsilon"), str(d.get("sampling", "poisson")),
                             str(d.get("method", "pld")), [DPRound(**r) for r in d.get("rounds", [])])


def classic_rdp_epsilon(orders: Iterable[float], rdp_values: Iterable[float], delta: float) -> float:
    """Epsilon from RDP by Mironov's conversion ``min_a rdp(a) + log(1/delta) / (a - 1)``.

    The conversion TF Privacy used when it published its tutorial numbers; ``dp-accounting``
    now applies a tighter one (Canonne, Kamath, Steinke 2020, Prop. 12), which gives smaller
    epsilons for the same RDP curve. Kept to compare with published values.
    """
    return float(min(r + math.log(1 / delta) / (a - 1) for a, r in zip(orders, rdp_values) if a > 1))
