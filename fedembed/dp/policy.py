"""An organisation's own DP rules: what it holds any recipe to, whatever the coordinator sends.

The local recipe (:class:`fedembed.recipe.TrainConfig`) comes from the coordinator, so a
coordinator could send ``dp_noise_multiplier = 0`` (no DP) or a budget of its choosing. An
organisation that must train privately sets its own floor and budget in its node config
(``fedembed client --dp-min-noise-multiplier 1.1 --dp-max-epsilon 8``); a recipe below
the floor is refused before anything is trained, and the budget it trains to is the
tighter of its own and the recipe's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedembed.dp import DPError


@dataclass(frozen=True)
class DPPolicy:
    """The DP floor and budget an organisation holds itself to.

    Parameters
    ----------
    min_noise_multiplier : float
        The smallest gradient noise multiplier it trains with; 0: it accepts training
        without DP (the default).
    max_epsilon : float
        Its own budget (epsilon at ``delta``); 0: none of its own (the recipe's applies).
    delta : float
        The delta its budget is stated at; 0: the recipe's.
    """

    min_noise_multiplier: float = 0.0
    max_epsilon: float = 0.0
    delta: float = 0.0

    def __post_init__(self) -> None:
        if self.min_noise_multiplier < 0 or self.max_epsilon < 0:
            raise DPError("dp-min-noise-multiplier and dp-max-epsilon must be >= 0")
        if not 0 <= self.delta < 1:
            raise DPError(f"dp-delta must be in [0, 1), got {self.delta}")

    @staticmethod
    def from_mapping(d: Mapping[str, object]) -> DPPolicy:
        """From node config: ``dp-min-noise-multiplier``, ``dp-max-epsilon``, ``dp-delta``."""
        try:
            return DPPolicy(float(d.get("dp-min-noise-multiplier", 0.0)), float(d.get("dp-max-epsilon", 0.0)),
                            float(d.get("dp-delta", 0.0)))
        except (TypeError, ValueError) as exc:
            raise DPError(f"node config dp-*: {exc}") from None

    def check(self, noise_multiplier: float, name: str = "dp_noise_multiplier") -> None:
        """Refuse a recipe whose noise multiplier is below this organisation's floor, or without DP under its budget.

        Parameters
        ----------
        noise_multiplier : float
            The multiplier of the DP mode the recipe turns on (0: none).
        name : str
            Its recipe field, for the message.

        Raises
        ------
        DPError
            Names both values.
        """
        if noise_multiplier <= 0 and self.max_epsilon > 0:
            raise DPError(f"the recipe turns no DP on, and this organisation trains under its own budget "
                          f"(dp-max-epsilon {self.max_epsilon:g}): without DP nothing would be accounted")
        if noise_multiplier < self.min_noise_multiplier:
            raise DPError(
                f"the recipe's {name} {noise_multiplier} is below this organisation's minimum "
                f"{self.min_noise_multiplier}"
            )

    def budget(self, recipe_epsilon: float, recipe_delta: float) -> tuple[float, float]:
        """The (epsilon, delta) it trains to: the tighter epsilon of its own and the recipe's (0: none)."""
        own = [e for e in (self.max_epsilon, recipe_epsilon) if e > 0]
        return (min(own) if own else 0.0), (self.delta or recipe_delta)
