"""The local training recipe: what every organisation's local training follows.

Torch-free, so the coordinator (which sends it) never imports torch; the training itself
is :mod:`fedembed.train`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from fedembed.errors import FedembedError


class RecipeError(FedembedError, ValueError):
    """A training recipe that cannot work."""


TABLE_OPTIMIZERS = ("sparse_adam", "sgd")
DP_UNITS = ("record", "user")
"""Privacy units of record-level DP: one training example, or one user with all their records."""


@dataclass
class TrainConfig:
    """The local training recipe; sent by the coordinator, the same for every organisation.

    The defaults were chosen on the validation splits of the movies task (5 orgs, 10
    rounds; see ``simulations/evaluate.py`` and the README): small batches, Adam state of
    touched rows kept across rounds, learning rates decayed by 0.8 per round (the models
    overfit within a few rounds otherwise), no FedRep head re-fit, no residual and no co-occurrence objective (both measured lower on validation).
    ``max_row_weight = 1`` with the coordinator's ``sum`` step was chosen on the
    validation splits of movies (one target and mixed targets) and synthetic (issue 12,
    README "Does federating pay off?").

    Parameters
    ----------
    epochs : int
        Local epochs over the organisation's training data per round (table and head).
    head_epochs : float
        Epochs re-fitting only the head on the freshly synced table before the table is
        touched (FedRep-style); 0 disables it. A fraction re-fits over that share of an
        epoch's batches (0.25: the first quarter of a shuffled epoch; 1.5: one epoch and
        half of another).
    batch_size : int
        Examples per local step.
    table_lr : float
        Learning rate of the local table optimizer.
    head_lr : float
        Learning rate of the head's Adam optimizer (its state persists across rounds).
    table_optimizer : str
        ``sparse_adam`` or ``sgd`` (both update only the rows a batch touched).
    max_row_weight : float
        Cap on the weight an organisation gives a row it touched (its lookup count) in
        the aggregate. 1 (the default): every organisation that touched a row counts
        once, so the default server step (``sum``) adds their deltas up.
    cooc_weight : float
        Weight of the shared self-supervised co-occurrence objective
        (:mod:`fedembed.cooc`) added to the supervised loss; 0 turns it off.
    cooc_negatives : int
        Negatives per positive pair of that objective.
    keep_table_state : bool
        Keep the local table optimizer's state (Adam moments) of the rows an
        organisation touched from one round to the next, in its private state.
    residual : bool
        Give each organisation a private residual on every shared table
        (:mod:`fedembed.residual`), trained locally, never uploaded (``fedembed`` mode).
    guard : bool
        Run the per-organisation guard (:mod:`fedembed.guard`): a private local-only
        twin is trained alongside, and each organisation serves whichever of the shared
        model and the twin scores higher on its own validation data (``fedembed`` mode).
        Off by default: it doubles every organisation's training time and table memory,
        and what it serves is not the shared model (see the README's "Guard" section).
    guard_window : int
        Evaluations whose validation scores the guard averages before choosing.
    guard_blend : bool
        Let the guard also serve the mean of the shared model's and the twin's outputs.
    head_weight_decay : float
        Decoupled weight decay of the head's optimizer (AdamW); 0 is plain Adam.
    lr_decay : float
        Per-round decay of both learning rates: round ``r`` (1-based) trains with
        ``lr * lr_decay ** (r - 1)`` (see :meth:`at_round`); 1 keeps them constant.
    dp_noise_multiplier : float
        Record-level DP (:mod:`fedembed.dp.local`): gradient noise std over ``dp_clip``;
        0 (the default) turns DP off. With DP, ``batch_size`` is the expected size of
        Poisson samples, and head re-fit, co-occurrence and residual must be off.
    dp_clip : float
        L2 bound of one example's gradient (shared tables and head together).
    dp_selection_noise_multiplier : float
        Row-count noise std over ``dp_count_clip`` (DP-AdaFEST row selection).
    dp_row_threshold : float
        A row's gradient is released in a step when its noisy contribution count reaches this.
    dp_count_clip : float
        L2 bound of one example's contribution counts over the rows it looks up.
    dp_unit : str
        The privacy unit of record-level DP: ``record`` (one training example) or ``user``
        (a user with all their records, as the task's ``privacy_units`` groups them:
        users are sampled, and each user's summed gradient and counts are clipped as one;
        ``dp_clip`` and ``dp_count_clip`` then bound a user).
    dp_target_epsilon : float
        The organisation's budget: no DP round starts that would take its epsilon past it;
        0 for no budget.
    dp_target_delta : float
        The delta epsilon is reported at.
    dp_sum_noise_multiplier : float
        Organisation-level distributed DP over secure aggregation (:mod:`fedembed.dp.distributed`):
        every organisation adds a discrete Gaussian share to its clipped update before
        masking, so that ``dp_noise_shares`` shares make noise of this standard deviation
        over ``dp_update_clip``; 0 (the default) turns it off. Needs ``--secure --row-set
        dense``; instead of record-level DP (``dp_noise_multiplier``), never with it.
    dp_update_clip : float
        L2 bound of one organisation's round delta (all tables) under distributed noise.
    dp_noise_shares : int
        Noise shares a secure sum is guaranteed to hold: each organisation adds ``1 /
        dp_noise_shares`` of the noise variance and helps unmask no sum of fewer vectors.
    serve_best : bool
        Early stopping on validation: every organisation serves the state of its
        evaluation with the best validation score so far and reports its metrics as
        ``best_*`` with ``best_round`` (:mod:`fedembed.stopping`), in every mode.
    keep_best_state : bool
        With ``serve_best``, also keep a copy of that state's head and tables in the
        organisation's ``best`` directory (a full table write at each improvement).
    prox_mu : float
        FedProx-style drift correction of the shared rows: after every local step, each
        row the step touched moves ``min(prox_mu * table_lr, 1)`` of the way back towards
        its synced value (a decoupled proximal term); 0 turns it off. The ``local``
        baseline has no synced value and ignores it.
    freeze_head : bool
        FedRep's alternation: the local epochs train the tables only, the head is trained
        by the ``head_epochs`` re-fit alone (which must then be on).
    patience : int
        Stop the run once no organisation's validation score has improved for this many
        rounds; 0 runs every round.
    pooled_normaliser : bool
        Re-scale every organisation's table step of a row from its own Adam normaliser to
        the federation's (:mod:`fedembed.normaliser`): each organisation also uploads its
        normaliser of the rows it touched (twice the upload), and the coordinator moves a
        row by ``sum_k delta_k sqrt(v_k / v)``. For tables that every organisation reads
        many times an epoch through heads of its own (``examples/links.py``); needs the
        ``sparse_adam`` table optimizer, and neither DP mode. True: every table.
    pooled_normaliser_rows : int
        Tables of at most this many rows carry the pooled normaliser even when
        ``pooled_normaliser`` is off (0: none). A small table is read many times an epoch
        by every organisation, and its wider upload costs little. Not applied (no table
        carries it) with the ``sgd`` table optimizer or either DP mode.
    """

    epochs: int = 1
    head_epochs: float = 0.0
    batch_size: int = 16
    table_lr: float = 0.05
    head_lr: float = 0.01
    table_optimizer: str = "sparse_adam"
    max_row_weight: float = 1.0
    cooc_weight: float = 0.0
    cooc_negatives: int = 4
    keep_table_state: bool = True
    residual: bool = False
    guard: bool = False
    guard_window: int = 3
    guard_blend: bool = True
    head_weight_decay: float = 0.0
    lr_decay: float = 0.8
    # record-level DP (fedembed.dp); off while dp_noise_multiplier == 0
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 1.0
    dp_selection_noise_multiplier: float = 1.0
    dp_row_threshold: float = 4.0
    dp_count_clip: float = 1.0
    dp_unit: str = "record"
    dp_target_epsilon: float = 0.0
    dp_target_delta: float = 1e-5
    # organisation-level distributed DP (fedembed.dp.distributed); off while dp_sum_noise_multiplier == 0
    dp_sum_noise_multiplier: float = 0.0
    dp_update_clip: float = 1.0
    dp_noise_shares: int = 2
    serve_best: bool = True
    keep_best_state: bool = False
    prox_mu: float = 0.0
    freeze_head: bool = False
    patience: int = 0
    pooled_normaliser: bool = False
    pooled_normaliser_rows: int = 1000

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise RecipeError(f"table_optimizer must be one of {TABLE_OPTIMIZERS}, got {self.table_optimizer!r}")
        for f in ("epochs", "batch_size", "guard_window"):
            if int(getattr(self, f)) < 1:
                raise RecipeError(f"{f} must be positive, got {getattr(self, f)}")
        if not self.head_epochs >= 0:
            raise RecipeError(f"head_epochs must be >= 0 (0: no re-fit), got {self.head_epochs}")
        for f in ("table_lr", "head_lr"):
            if not getattr(self, f) > 0:
                raise RecipeError(f"{f} must be > 0 (a learning rate), got {getattr(self, f)}")
        if not self.max_row_weight >= 1:
            raise RecipeError(f"max_row_weight must be >= 1, got {self.max_row_weight}")
        if not self.cooc_weight >= 0:
            raise RecipeError(f"cooc_weight must be >= 0 (0: no co-occurrence objective), got {self.cooc_weight}")
        if not 0 < self.lr_decay <= 1:
            raise RecipeError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.freeze_head and not self.head_epochs > 0:
            raise RecipeError("freeze_head trains the head in the head_epochs re-fit only: head_epochs must be > 0")
        if self.prox_mu < 0:
            raise RecipeError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if int(self.patience) < 0:
            raise RecipeError(f"patience must be >= 0 (0: no early stop), got {self.patience}")
        if self.head_weight_decay < 0:
            raise RecipeError(f"head_weight_decay must be >= 0, got {self.head_weight_decay}")
        self._check_dp()
        if not self.pooled_normaliser_rows >= 0:  # an integer already (_check_numbers)
            raise RecipeError(f"pooled_normaliser_rows must be an integer >= 0 (0: no table), "
                              f"got {self.pooled_normaliser_rows!r}")
        clash = self.pooled_clash()
        if self.pooled_normaliser and clash:
            raise RecipeError(f"pooled_normaliser re-scales Adam's steps and its normalisers are not privatised: it "
                              f"needs table_optimizer 'sparse_adam' and no DP, got {', '.join(clash)}")

    def _check_numbers(self) -> None:
        """Every number of the recipe is a finite number of its kind (before any range is checked).

        The recipe comes from the coordinator: a NaN or an infinity in any of its numbers
        (an infinite learning rate passes ``> 0``) would make an organisation's private
        head non-finite for good. Integer fields take integers only (a float of integral
        value, as JSON may carry one, is taken as that integer).

        Raises
        ------
        RecipeError
            Names the field and its value.
        """
        for f in fields(self):
            if f.type not in ("float", "int"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RecipeError(f"{f.name} must be a finite number, got {value!r}")
            if f.type == "int":
                if not float(value).is_integer():
                    raise RecipeError(f"{f.name} must be an integer, got {value!r}")
                setattr(self, f.name, int(value))

    def pooled_clash(self) -> list[str]:
        """The settings that keep every table from carrying the pooled normaliser (empty: none).

        It re-scales Adam's steps (the ``sparse_adam`` table optimizer) and its normalisers
        are not privatised (neither DP mode).
        """
        clash = [f"table_optimizer {self.table_optimizer!r}"] if self.table_optimizer != "sparse_adam" else []
        clash += ["dp_noise_multiplier > 0"] if self.dp else []
        clash += ["dp_sum_noise_multiplier > 0"] if self.dp_distributed else []
        return clash

    def pooled_tables(self, shapes: Mapping[str, tuple[int, int]]) -> frozenset[str]:
        """The tables whose uploads carry the pooled normaliser (:mod:`fedembed.normaliser`).

        Parameters
        ----------
        shapes : Mapping[str, tuple[int, int]]
            ``(rows, dim)`` of every shared table.

        Returns
        -------
        frozenset[str]
            Every table with ``pooled_normaliser``; else those of at most
            ``pooled_normaliser_rows`` rows, none with the ``sgd`` table optimizer or DP.
        """
        if self.pooled_normaliser:
            return frozenset(shapes)
        if self.pooled_clash():
            return frozenset()
        return self.small_tables(shapes)

    def small_tables(self, shapes: Mapping[str, tuple[int, int]]) -> frozenset[str]:
        """The tables of at most ``pooled_normaliser_rows`` rows (those the pooled normaliser's default is for)."""
        return frozenset(n for n, (rows, _dim) in shapes.items() if int(rows) <= self.pooled_normaliser_rows)

    def _check_dp(self) -> None:
        if self.dp_unit not in DP_UNITS:
            raise RecipeError(f"dp_unit must be one of {DP_UNITS}, got {self.dp_unit!r}")
        for f in ("dp_noise_multiplier", "dp_target_epsilon", "dp_sum_noise_multiplier"):
            value = getattr(self, f)
            if not value >= 0:  # a finite number already (_check_numbers)
                raise RecipeError(f"{f} must be a finite number >= 0, got {value!r}")
        if self.dp and self.dp_distributed:
            raise RecipeError("choose one privacy unit: record-level DP (dp_noise_multiplier) or organisation-level "
                              "distributed noise (dp_sum_noise_multiplier), not both")
        if not (self.dp or self.dp_distributed) and self.dp_target_epsilon > 0:
            raise RecipeError(f"dp_target_epsilon {self.dp_target_epsilon:g} without a DP mode: nothing would be "
                              "accounted or stopped; turn one on (dp_noise_multiplier for record-level DP, "
                              "dp_sum_noise_multiplier for distributed noise) or drop the budget")
        if not self.dp and self.dp_unit != "record":
            raise RecipeError(f"dp_unit {self.dp_unit!r} is the unit of record-level DP (dp_noise_multiplier), which "
                              "is off" + (": distributed noise protects a whole organisation's update"
                                          if self.dp_distributed else ""))
        if self.dp_distributed:
            if not self.dp_update_clip > 0:
                raise RecipeError(f"dp_update_clip must be > 0 with distributed noise, got {self.dp_update_clip}")
            if self.dp_noise_shares < 1:  # an integer already (_check_numbers)
                raise RecipeError(f"dp_noise_shares must be an integer >= 1, got {self.dp_noise_shares}")
            if not 0 < self.dp_target_delta < 1:
                raise RecipeError(f"dp_target_delta must be in (0, 1), got {self.dp_target_delta}")
        if not self.dp:
            return
        for f in ("dp_clip", "dp_selection_noise_multiplier", "dp_row_threshold", "dp_count_clip"):
            value = getattr(self, f)
            if not value > 0:
                raise RecipeError(f"{f} must be a finite number > 0 with DP on, got {value!r}")
        if not 0 < self.dp_target_delta < 1:
            raise RecipeError(f"dp_target_delta must be in (0, 1), got {self.dp_target_delta}")
        if self.head_epochs or self.cooc_weight > 0 or self.residual:
            raise RecipeError("with DP on, head_epochs, cooc_weight and residual must be off (they would train on "
                              "the data outside the DP mechanism)")

    @property
    def dp(self) -> bool:
        """Whether local training is record-level DP (:mod:`fedembed.dp.local`)."""
        return self.dp_noise_multiplier > 0

    @property
    def dp_distributed(self) -> bool:
        """Whether secure sums carry organisation-level distributed noise (:mod:`fedembed.dp.distributed`)."""
        return self.dp_sum_noise_multiplier > 0

    @property
    def dp_active_noise_multiplier(self) -> float:
        """The noise multiplier of whichever DP mode is on (0: none): what an organisation's floor is held against.

        Record-level DP runs two Gaussian mechanisms on each step, the gradient's noise and
        the row selection's; its ledger charges them as one, of multiplier
        ``(dp_noise_multiplier ** -2 + dp_selection_noise_multiplier ** -2) ** -0.5``
        (:func:`fedembed.dp.accounting.effective_noise_multiplier`), smaller than either.
        That is the multiplier the floor holds: a gradient noise of 2 with a selection
        noise of 0.05 is a mechanism of 0.05 (one round cost epsilon 1467).
        """
        if self.dp:
            from fedembed.dp.accounting import effective_noise_multiplier

            return effective_noise_multiplier(self.dp_noise_multiplier, self.dp_selection_noise_multiplier)
        return self.dp_sum_noise_multiplier

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for messages and metrics.json)."""
        return asdict(self)

    def at_round(self, round_: int) -> TrainConfig:
        """The recipe of round ``round_`` (1-based): learning rates decayed by ``lr_decay``."""
        f = self.lr_decay ** max(int(round_) - 1, 0)
        return replace(self, table_lr=self.table_lr * f, head_lr=self.head_lr * f)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class WorkLimits:
    """The most work an organisation lets one message's recipe ask of it (its own rule, node config ``max-*``).

    The recipe is the coordinator's, and bounded only from below: ``epochs`` 200 or
    ``cooc_negatives`` 20,000 had one message keep an organisation's worker busy for
    minutes or allocate gigabytes, and a message refused after such a failure can be sent
    again. The defaults are generous (ten times the default recipe's epochs and more);
    an organisation sets its own.

    Parameters
    ----------
    max_epochs : float
        Most local epochs (``epochs``) and head re-fit epochs (``head_epochs``) per round.
    max_cooc_negatives : int
        Most sampled negatives of the co-occurrence objective (``cooc_negatives``).
    max_batch_size : int
        Largest batch (``batch_size``).
    """

    max_epochs: float = 10.0
    max_cooc_negatives: int = 256
    max_batch_size: int = 65536

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise RecipeError(f"{f.name.replace('_', '-')} must be a finite number > 0, got {value!r}")

    @staticmethod
    def from_mapping(d: Mapping[str, object]) -> WorkLimits:
        """From node config: ``max-epochs``, ``max-cooc-negatives``, ``max-batch-size`` (absent: the defaults)."""
        kw: dict[str, Any] = {}
        for key, name, kind in (("max-epochs", "max_epochs", float), ("max-cooc-negatives", "max_cooc_negatives", int),
                                ("max-batch-size", "max_batch_size", int)):
            if key in d:
                try:
                    kw[name] = kind(d[key])  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    raise RecipeError(f"node config {key} must be a number, got {d[key]!r}") from None
        return WorkLimits(**kw)

    def check(self, recipe: TrainConfig) -> None:
        """Refuse a recipe asking more than these limits.

        Raises
        ------
        RecipeError
            Naming the field, its value and the limit.
        """
        for field_name, limit in (("epochs", self.max_epochs), ("head_epochs", self.max_epochs),
                                  ("cooc_negatives", self.max_cooc_negatives), ("batch_size", self.max_batch_size)):
            value = getattr(recipe, field_name)
            if value > limit:
                raise RecipeError(f"the recipe's {field_name} {value:g} is above this organisation's limit {limit:g} "
                                  f"(node config max-{field_name.replace('head_', '').replace('_', '-')})")
