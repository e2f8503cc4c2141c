"""Injected dropouts, for simulation, tests and demos (no heavy imports: every stage uses it)."""

from __future__ import annotations

import json
import logging

from fedembed.errors import FedembedError

log = logging.getLogger(__name__)


class SimulatedDropout(FedembedError, RuntimeError):
    """Raised by an organisation told to vanish at a stage (:attr:`fedembed.config.RunConfig.drop`)."""


def should_drop(drop: str | dict, stage: str, round_: int, org: int) -> bool:
    """Whether organisation ``org`` is to vanish at ``stage`` of ``round_``.

    Parameters
    ----------
    drop : str or dict
        ``{"<stage>": [org, ...], "<stage>@<round>": [...]}`` (or its JSON).
    stage : str
        The stage being handled (``evaluate`` for the closing evaluation, never dropped
        unless named).
    round_ : int
        The round.
    org : int
        The organisation's index.
    """
    spec = json.loads(drop) if isinstance(drop, str) else drop
    return org in spec.get(stage, []) or org in spec.get(f"{stage}@{round_}", [])


def check_drop(drop: str | dict, stage: str, round_: int, org: int) -> None:
    """Raise :class:`SimulatedDropout` (and log it) when :func:`should_drop` says so."""
    if should_drop(drop, stage, round_, org):
        log.warning("organisation %d vanishes at stage %s of round %d (injected dropout)", org, stage, round_)
        raise SimulatedDropout(f"organisation {org} dropped at stage {stage} of round {round_}")
