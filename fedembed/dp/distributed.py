"""Distributed DP over secure aggregation: each organisation adds a discrete Gaussian share before masking.

The distributed discrete Gaussian of Kairouz, Liu and Steinke (ICML 2021). With
``--secure --row-set dense`` and ``dp_sum_noise_multiplier = sigma > 0`` in the recipe, every
organisation, at the masked stage of a secure round:

1. takes its round update ``delta`` (the rows it touched, as the wire carries them), clips
   every entry to ``delta_clip`` and the whole of it (every table) to L2 norm ``C =
   dp_update_clip``;
2. encodes ``W * delta`` (``W = max_row_weight``, the same public weight on *every* row: a
   lookup count would tell which rows it used) over all rows of every table in fixed
   point, ``q = round(W * delta * s)`` with ``s = 2^20 / (W C)`` (:attr:`DistributedNoise.scale`):
   an update at the clip is ``2^20`` integer units long, and rounding adds at most
   ``sqrt(L) / 2`` in L2 over the ``L`` entries, so the encoded update's L2 sensitivity is
   ``D2 = 2^20 + sqrt(L) / 2`` (and its L1 sensitivity ``min(sqrt(L) D2, D2^2)``);
3. adds to every entry an exact discrete Gaussian ``N_Z(0, S)`` with
   ``S >= sigma^2 D2^2 / m`` (:func:`fedembed.dp.noise.discrete_gaussian_variance`), from
   its own secret key (:mod:`fedembed.dp.noise`), and masks the vector as usual.

The coordinator unmasks only the sum: the ``d`` delivered updates plus ``d`` noise shares,
a noise of variance ``d S >= (d / m) sigma^2 D2^2``. No organisation's own vector carries
more than ``1 / m`` of the noise variance, so each depends on the masking to hide it.

**Privacy unit**: one organisation's round update, add-or-remove (its update present, or
zero) -- organisation-level DP, the unit of distributed DP in federated learning; it
covers every record of that organisation at once. The organisation's ledger
(:class:`fedembed.dp.accounting.PrivacyLedger`) records each round as a
:class:`~fedembed.dp.accounting.DistributedRound` of ``m`` shares (the guaranteed minimum:
more shares only add noise, a post-processing) and composes them over rounds. Replacing
one organisation's data by any other (a single changed record included) moves its clipped
update by up to ``2 C``: the guarantee at half the noise multiplier. This mode is instead of
the record-level one (:mod:`fedembed.dp.local`), never on top of it.

**Dropouts**: the protocol sums the vectors of the ``d`` organisations that delivered
(dropped ones' masks are removed, their noise is simply absent). Each organisation adds
``1 / m`` of the variance and, at the secure ``check`` stage, refuses to help unmask a sum
of fewer than ``m + colluders`` vectors (its :class:`fedembed.secagg.protocol.SecurePolicy`
``min_delivered`` is raised to that), so any sum that is unmasked carries at least ``m``
honest shares. ``metrics.json`` records the noise actually present
(``rounds[i].secure.dp``).

**Row sets**: ``dense`` only. In ``union`` the union of touched rows and the number of
organisations per row, and in ``revealed`` each organisation's own row set, are released
without noise and would sit outside the guarantee; a recipe with distributed noise and
another row set is refused (noisy indicators, DP-FEST style, are not built).

**Trust**: the secure aggregation protocol and its threat model (a coordinator colluding
with at most ``colluders`` organisations, README "Threat model"); and honest noise shares
from at least ``m`` organisations: an organisation that adds less noise than it should
cannot be detected (its share is masked), so the guarantee counts only shares from
organisations one trusts to follow the code.

**Wrap-around**: the modular sum must equal the integer sum. With ``n`` parties, every
entry of the sum is at most ``n W min(delta_clip, C) s + n/2`` in magnitude plus the noise
of ``n`` shares, which is sub-Gaussian with variance proxy ``n S`` (a discrete Gaussian is
``S``-sub-Gaussian, Canonne et al. 2020): the noise exceeds
``T = sqrt(2 n S ln(2 L / 2^-40))`` at any of the ``L`` entries with probability at most
``2^-40`` (:meth:`DistributedNoise.tail`). :meth:`DistributedNoise.check_no_wrap` refuses a
round whose ``n`` would let the sum reach ``2^31``; the coordinator's bound check of the
decoded sum allows the same tail for the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedembed.dp import DPError
from fedembed.dp.accounting import DistributedRound
from fedembed.dp.noise import MAX_VARIANCE, discrete_gaussian_variance
from fedembed.recipe import TrainConfig

SENSITIVITY_QUANTA = 2**20
"""Integer length of one organisation's update at the L2 clip (``W C s``)."""
TAIL_FAILURE = 2.0**-40
"""Probability that the noise of a sum exceeds :meth:`DistributedNoise.tail` at some entry."""
_HALF = 2**31 - 1


@dataclass(frozen=True)
class DistributedNoise:
    """The distributed discrete Gaussian of one federation's secure rounds (see the module docstring).

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: the standard deviation of the noise of ``shares`` shares over the L2
        sensitivity.
    clip : float
        ``C``: L2 bound of one organisation's round delta (all tables).
    shares : int
        ``m``: shares the sum is guaranteed to hold; each organisation adds ``1/m`` of the variance.
    max_weight : float
        ``W``: the public weight every organisation gives every row.
    clip_delta : float
        Bound of one entry of ``delta`` (the secure sum's ``--delta-clip``).
    entries : int
        ``L``: entries noised (``rows x dim`` summed over the tables: the dense row set).
    """

    noise_multiplier: float
    clip: float
    shares: int
    max_weight: float
    clip_delta: float
    entries: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.clip > 0 and self.clip_delta > 0):
            raise DPError(f"distributed noise needs a noise multiplier, an update clip and a delta clip > 0: {self}")
        if int(self.shares) < 1 or self.max_weight < 1 or int(self.entries) < 1:
            raise DPError(f"distributed noise needs shares >= 1, max_weight >= 1 and entries >= 1: {self}")
        if self.noise_multiplier**2 * self.l2_sensitivity**2 / self.shares > MAX_VARIANCE:
            raise DPError(f"noise multiplier {self.noise_multiplier} is beyond what the sampler draws exactly "
                          "(a share variance above 2^60); lower it")

    @staticmethod
    def for_recipe(cfg: TrainConfig, shapes: Mapping[str, tuple[int, int]], clip_delta: float) -> DistributedNoise | None:
        """The noise a recipe asks for over tables of ``shapes`` (None: no distributed noise)."""
        if not cfg.dp_distributed:
            return None
        entries = sum(int(r) * int(d) for r, d in shapes.values())
        return DistributedNoise(float(cfg.dp_sum_noise_multiplier), float(cfg.dp_update_clip), int(cfg.dp_noise_shares),
                                float(cfg.max_row_weight), float(clip_delta), entries)

    def to_dict(self) -> dict[str, float | int]:
        """Plain data (the secure session keeps it)."""
        return {"noise_multiplier": self.noise_multiplier, "clip": self.clip, "shares": self.shares,
                "max_weight": self.max_weight, "clip_delta": self.clip_delta, "entries": self.entries}

    @property
    def scale(self) -> float:
        """``s``: fixed-point units per unit of ``W * delta``."""
        return SENSITIVITY_QUANTA / (self.max_weight * self.clip)

    @property
    def entry_clip(self) -> float:
        """Bound of one entry of ``W * delta`` (real units)."""
        return self.max_weight * min(self.clip_delta, self.clip)

    @property
    def l2_sensitivity(self) -> float:
        """``D2``: L2 bound of one encoded update, rounding included (integer units)."""
        return SENSITIVITY_QUANTA + math.sqrt(self.entries) / 2.0

    @property
    def l1_sensitivity(self) -> float:
        """``D1``: L1 bound of one encoded update (an integer vector: ``||v||_1 <= ||v||_2^2``)."""
        d2 = self.l2_sensitivity
        return min(math.sqrt(self.entries) * d2, d2 * d2)

    @property
    def local_variance(self) -> int:
        """``S``: the variance of each organisation's discrete Gaussian share (integer units)."""
        return discrete_gaussian_variance(self.noise_multiplier**2 * self.l2_sensitivity**2 / self.shares)[0]

    def round(self) -> DistributedRound:
        """What an organisation's ledger records for a round it takes part in."""
        return DistributedRound(self.local_variance, int(self.shares), self.l2_sensitivity, self.l1_sensitivity,
                                int(self.entries))

    def std_in_sum(self, delivered: int) -> float:
        """Standard deviation of the noise of ``delivered`` shares, in units of ``sum W * delta``."""
        return math.sqrt(delivered * self.local_variance) / self.scale

    def tail(self, delivered: int) -> float:
        """Integer bound the noise of ``delivered`` shares exceeds at some entry with probability <= 2^-40."""
        return math.sqrt(2.0 * delivered * self.local_variance * math.log(2.0 * self.entries / TAIL_FAILURE))

    def sum_bound(self, delivered: int) -> float:
        """Largest magnitude (integer units) of one entry of an honest sum of ``delivered`` vectors (w.p. 1 - 2^-40)."""
        return delivered * (self.entry_clip * self.scale + 0.5) + self.tail(delivered)

    def check_no_wrap(self, n: int) -> None:
        """Refuse ``n`` parties whose noisy sum could wrap around 2^32.

        Raises
        ------
        DPError
            Names ``n``, the bound and what to change.
        """
        if self.sum_bound(n) >= _HALF:
            raise DPError(
                f"{n} organisations with distributed noise multiplier {self.noise_multiplier} over {self.shares} shares "
                f"could wrap the 32-bit secure sum (bound {self.sum_bound(n):.3g} >= 2^31): sample fewer organisations "
                "per round, raise dp_noise_shares or lower the noise multiplier"
            )
