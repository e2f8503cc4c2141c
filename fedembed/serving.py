"""What an organisation serves: its serving policy, chosen after every evaluation.

A round's evaluation scores the shared model (the synced tables with the organisation's
private head). A :class:`ServingPolicy` then decides which model the organisation would
serve and returns that model's metrics, the ones it reports. Two policies ship:

- :class:`SharedOnly` (the default): the shared model itself;
- :class:`fedembed.guard.Guard` (``TrainConfig.guard``, opt-in): the shared model, a
  private local-only twin, or their blend, whichever validation favours. It trains the
  twin alongside, which doubles the organisation's local training and table memory.

A policy never changes what is uploaded: the shared model trains and sends its row deltas
whatever is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from fedembed.recipe import TrainConfig
from fedembed.task import Task


@dataclass
class ServingContext:
    """Where a serving decision is taken.

    Attributes
    ----------
    task : Task
        The organisation's task.
    cfg : TrainConfig
        The round's recipe.
    round : int
        The round whose stage this is.
    seed : int
        The run's seed.
    table_scale : float
        Standard deviation of the seeded version-0 tables.
    run_key : str
        Identifies the run (state of another run is discarded).
    shapes : dict
        ``(rows, dim)`` of the shared tables.
    train : bool
        A training stage (False: the closing evaluation).
    who : str
        The organisation's name.
    """

    task: Task
    cfg: TrainConfig
    round: int
    seed: int
    table_scale: float
    run_key: str
    shapes: dict[str, tuple[int, int]]
    train: bool
    who: str


class ServingPolicy(Protocol):
    """Chooses what the organisation serves after an evaluation."""

    name: str

    def serve(self, ctx: ServingContext, shared_model: nn.Module, shared_metrics: dict[str, float]) -> dict[str, float]:
        """The metrics of the model served this round (the shared model's are ``shared_metrics``)."""
        ...


class SharedOnly:
    """Serve the shared model: the synced tables with the organisation's private head."""

    name = "shared"

    def serve(self, ctx: ServingContext, shared_model: nn.Module, shared_metrics: dict[str, float]) -> dict[str, float]:  # noqa: D102
        return shared_metrics

