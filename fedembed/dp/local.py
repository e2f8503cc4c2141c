"""Record-level DP inside an organisation, row-sparse (DP-AdaFEST style): one step, and the local epochs.

One DP step (:class:`RowSparseDPSGD`):

1. sample examples (Poisson, rate ``q = batch_size / N``, :func:`dp_epochs`);
2. per-example losses, per-example gradient norms over tables and head, each example's
   gradient clipped to ``clip`` (:mod:`fedembed.dp.clipping`: rows looked up only);
3. noisy per-row contribution counts, each example contributing at most ``count_clip`` in
   L2 over the rows it looked up, noise ``selection_noise_multiplier x count_clip``; the
   rows whose noisy count is ``>= row_threshold`` are selected (:mod:`fedembed.dp.selection`);
4. the clipped gradient sum on the selected rows only, plus ``N(0, (noise_multiplier x
   clip)^2)`` per entry, divided by the expected batch size ``q N``, becomes the table's
   sparse gradient; unselected rows get none, so they do not move and never leave. The head
   gets its clipped sum plus the same noise, dense (the head never leaves, but it shapes
   every later table gradient, so it must be trained privately too);
5. the optimizers step as usual (post-processing).

A step is thus two Gaussian mechanisms on the same sample (counts, gradients), accounted
as one with :func:`fedembed.dp.accounting.effective_noise_multiplier`. What an
organisation uploads after a round -- the delta of the rows selected in any step, each
weighted by how many steps selected it (capped) -- is a post-processing of those releases,
so the round's update is (epsilon, delta)-DP for every training example, with epsilon from
the organisation's :class:`~fedembed.dp.accounting.PrivacyLedger`.

Every random choice of a step -- the Poisson sample, the selection noise, the gradient
noise -- comes from the organisation's secret ChaCha20 stream
(:class:`fedembed.dp.noise.SecureRandom`), never from the run-seeded numpy generator that
shuffles its non-private training: the coordinator, which chose the run's seed, can neither
regenerate the noise nor know which examples a step sampled.

Not covered (say so wherever numbers are reported): the example count, the training loss
and the evaluation metrics an organisation also reports are computed from its data without
noise; the gradient noise is a floating-point Gaussian (Box-Muller over the secret stream),
with the floating-point caveats of every float Gaussian mechanism (Mironov 2012).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedembed.dp import DPError
from fedembed.dp.accounting import DPRound, PrivacyLedger, effective_noise_multiplier
from fedembed.dp.clipping import ClippedBatch, ExampleGradients
from fedembed.dp.noise import DPRandom
from fedembed.dp.selection import example_count_scale, select_rows
from fedembed.model import SplitModel
from fedembed.recipe import TrainConfig
from fedembed.task import to_device

log = logging.getLogger(__name__)


class DPTask(Protocol):
    """What a task needs for DP training besides :class:`fedembed.task.Task` (``BagTask`` has both)."""

    device: torch.device

    def num_examples(self, split: str) -> int: ...  # noqa: D102

    def batch_of(self, split: str, idx: np.ndarray) -> Any: ...  # noqa: D102

    def example_losses(self, model: SplitModel, batch: Any) -> torch.Tensor: ...  # noqa: D102


def privacy_units(task: Any, split: str = "train") -> np.ndarray:
    """Each example's privacy unit (a user with all their records), from the task's ``privacy_units(split)``.

    Raises
    ------
    DPError
        The task does not say which records belong together, or says it inconsistently.
    """
    method = getattr(task, "privacy_units", None)
    units = method(split) if callable(method) else None
    if units is None:
        raise DPError("dp_unit 'user' needs the task to say which records belong together: implement "
                      "privacy_units(split), one user id per example (fedembed.task.Task.privacy_units)")
    units = np.asarray(units)
    n = int(task.num_examples(split))
    if units.shape != (n,) or not np.issubdtype(units.dtype, np.integer):
        raise DPError(f"privacy_units({split!r}) must give one integer user id per example ({n}), got "
                      f"{units.dtype}{units.shape}")
    return units


@dataclass(frozen=True)
class DPConfig:
    """The DP parameters of local training.

    Parameters
    ----------
    noise_multiplier : float
        Gradient noise standard deviation over ``clip``.
    clip : float
        L2 bound of one example's gradient over all shared tables and the head.
    selection_noise_multiplier : float
        Row-count noise standard deviation over ``count_clip``.
    row_threshold : float
        A row is selected when its noisy contribution count is at least this (> 0). Each
        example adds at most 1 to a row's count; untouched rows cross the threshold with
        probability ``P(N(0, (selection_noise_multiplier x count_clip)^2) >= row_threshold)``
        per step (pure-noise rows in the upload).
    count_clip : float
        L2 bound of one example's contribution-count vector (its looked-up rows).
    unit : str
        ``record`` or ``user``: with ``user``, ``clip`` and ``count_clip`` bound a user's
        summed contribution, and users are sampled (:func:`dp_epochs`).
    """

    noise_multiplier: float
    clip: float
    selection_noise_multiplier: float
    row_threshold: float
    count_clip: float = 1.0
    unit: str = "record"

    def __post_init__(self) -> None:
        for f in ("noise_multiplier", "clip", "selection_noise_multiplier", "row_threshold", "count_clip"):
            if not getattr(self, f) > 0:
                raise DPError(f"{f} must be > 0, got {getattr(self, f)}")
        if self.unit not in ("record", "user"):
            raise DPError(f"unit must be 'record' or 'user', got {self.unit!r}")

    @property
    def effective_noise_multiplier(self) -> float:
        """The one Gaussian mechanism a step amounts to (counts and gradients on one sample)."""
        return effective_noise_multiplier(self.noise_multiplier, self.selection_noise_multiplier)


@dataclass
class StepReport:
    """What one DP step did (local diagnostics; not private, never sent).

    Attributes
    ----------
    examples : int
        Examples in the sample.
    loss : float
        Sum of their losses.
    selected : dict[str, np.ndarray]
        Per table, the sorted rows whose gradient was released.
    clipped : int
        Examples whose gradient norm exceeded the clip.
    """

    examples: int
    loss: float
    selected: dict[str, np.ndarray]
    clipped: int


class RowSparseDPSGD:
    """Leaves noisy, clipped, row-sparse gradients in a model's ``.grad`` (see the module docstring).

    Parameters
    ----------
    model : SplitModel
        The organisation's model (head of ``nn.Linear`` layers, no residual).
    cfg : DPConfig
        The DP parameters.
    rng : DPRandom
        The source of all noise (:class:`fedembed.dp.noise.SecureRandom`; a numpy
        ``Generator`` in tests only).
    """

    def __init__(self, model: SplitModel, cfg: DPConfig, rng: DPRandom) -> None:
        self.model, self.cfg, self.rng = model, cfg, rng
        self.tracer = ExampleGradients(model)

    def step(self, task: DPTask, batch: Any | None, denominator: float, units: np.ndarray | None = None) -> StepReport:
        """Compute the private gradients of one sampled batch and put them in ``.grad``.

        Parameters
        ----------
        task : DPTask
            Gives the per-example losses.
        batch : Any or None
            The sampled examples (None or an empty batch: a step of pure noise, which a
            Poisson step with no example still is).
        denominator : float
            The data-independent normaliser (the expected batch size ``q N``, in units).
        units : np.ndarray, optional
            Each example's privacy unit in this batch, numbered ``0..G-1`` (``dp_unit
            user``): a unit is clipped and counted as one.

        Returns
        -------
        StepReport
        """
        model, cfg = self.model, self.cfg
        clipped: ClippedBatch | None = None
        loss_sum, n = 0.0, 0
        if batch is not None:
            with self.tracer:
                losses = task.example_losses(model, batch)
                n = int(losses.shape[0])
                if n:
                    if not torch.all(torch.isfinite(losses)):
                        raise FloatingPointError("a training loss became non-finite; lower the learning rates")
                    clipped = self.tracer.clip(losses, cfg.clip,
                                               torch.from_numpy(units).long() if units is not None else None)
                    loss_sum = float(losses.detach().sum())
        selected = self._select(clipped, int(clipped.norms.shape[0]) if clipped is not None else 0)
        std = cfg.noise_multiplier * cfg.clip
        for name in model.table_names:
            w = model.table(name).weight
            ids = selected[name]
            values = torch.from_numpy(self.rng.normal(0.0, std, size=(ids.shape[0], w.shape[1]))).to(w.dtype)
            tg = clipped.tables.get(name) if clipped is not None else None
            if tg is not None and ids.size:
                rows = tg.rows.cpu().numpy()
                pos = np.searchsorted(rows, ids)
                hit = (pos < rows.shape[0]) & (rows[np.minimum(pos, rows.shape[0] - 1)] == ids)
                if hit.any():
                    values[torch.from_numpy(np.flatnonzero(hit))] += tg.clipped_sum[torch.from_numpy(pos[hit])].cpu()
            index = torch.from_numpy(ids).to(w.device).unsqueeze(0)
            w.grad = torch.sparse_coo_tensor(index, (values / denominator).to(w.device), tuple(w.shape),
                                             check_invariants=False, is_coalesced=True)  # ids: sorted, unique
        for i, p in enumerate(model.head_parameters()):
            noise = torch.from_numpy(self.rng.normal(0.0, std, size=tuple(p.shape))).to(p.dtype).to(p.device)
            summed = clipped.head[i] if clipped is not None else torch.zeros_like(p)
            p.grad = (summed.detach() + noise) / denominator
        n_clipped = int((clipped.norms > cfg.clip).sum()) if clipped is not None else 0
        return StepReport(n, loss_sum, selected, n_clipped)

    def _select(self, clipped: ClippedBatch | None, n: int) -> dict[str, np.ndarray]:
        """The rows released this step, per table (noisy contribution counts over the threshold)."""
        cfg, model = self.cfg, self.model
        k = np.zeros(n, dtype=np.int64)
        if clipped is not None:
            for tg in clipped.tables.values():
                k += np.bincount(tg.pair_example.cpu().numpy(), minlength=n)
        scale = example_count_scale(k, cfg.count_clip)
        out = {}
        for name in model.table_names:
            tg = clipped.tables.get(name) if clipped is not None else None
            if tg is not None:
                pair_ex, pair_row = tg.pair_example.cpu().numpy(), tg.pair_row.cpu().numpy()
                touched, inv = np.unique(pair_row, return_inverse=True)
                counts = np.bincount(inv, weights=scale[pair_ex], minlength=touched.shape[0])
            else:
                touched, counts = np.zeros(0, np.int64), np.zeros(0)
            mod = model.table(name)
            ids, _ = select_rows(touched, counts, mod.weight.shape[0], cfg.selection_noise_multiplier * cfg.count_clip,
                                 cfg.row_threshold, self.rng, exclude=mod.padding_idx)
            out[name] = ids
        return out


def dp_epochs(
    task: DPTask,
    model: SplitModel,
    cfg: DPConfig,
    batch_size: int,
    epochs: int,
    optimizers: list[torch.optim.Optimizer],
    rng: DPRandom,
    lookups: dict[str, list[np.ndarray]],
) -> tuple[float, int, DPRound]:
    """``epochs`` epochs' worth of Poisson-sampled DP steps; the rows each step released go to ``lookups``.

    Parameters
    ----------
    task : DPTask
        The organisation's task (``num_examples``, ``batch_of``, ``example_losses``).
    model : SplitModel
        Its model, trained in place.
    cfg : DPConfig
        The DP parameters.
    batch_size : int
        Expected sample size: the sampling rate is ``batch_size / N``.
    epochs : int
        Steps run: ``epochs * ceil(N / batch_size)``.
    optimizers : list[torch.optim.Optimizer]
        Stepped after each DP step (table and head).
    rng : DPRandom
        Sampling and noise (the organisation's :class:`fedembed.dp.noise.SecureRandom`).
    lookups : dict[str, list[np.ndarray]]
        Per table, appended with the rows released at each step: after the round a row's
        count is the number of steps that released it, a DP weight (post-processing).

    Returns
    -------
    loss_sum : float
        Sum of the sampled examples' losses (a local diagnostic, not private).
    examples : int
        Examples sampled over all steps (not private either).
    round : DPRound
        What to record in the organisation's privacy ledger.
    """
    for name in ("batch_of", "example_losses"):
        if not callable(getattr(task, name, None)):
            raise DPError(f"DP training needs the task to implement {name}() (see fedembed.dp.local.DPTask)")
    n = int(task.num_examples("train"))
    if n < 1:
        raise DPError("DP training needs at least one training example")
    q = min(1.0, batch_size / n)
    steps = int(epochs) * math.ceil(n / batch_size)
    # the sampled population: examples, or users (each with all their records; q stays batch_size / n, so a
    # step still holds batch_size examples on average)
    user_of = np.unique(privacy_units(task), return_inverse=True)[1] if cfg.unit == "user" else None
    population = int(user_of.max()) + 1 if user_of is not None else n
    dp = RowSparseDPSGD(model, cfg, rng)
    loss_sum, seen = 0.0, 0
    for _ in range(steps):
        units = None
        if user_of is None:
            idx = np.flatnonzero(rng.random(n) < q)
        else:
            idx = np.flatnonzero((rng.random(population) < q)[user_of])
            units = np.unique(user_of[idx], return_inverse=True)[1]
        batch = to_device(task.batch_of("train", idx), task.device) if idx.size else None
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        report = dp.step(task, batch, denominator=q * population, units=units)
        for opt in optimizers:
            opt.step()
        for name, ids in report.selected.items():
            lookups.setdefault(name, []).append(ids)
        loss_sum += report.loss
        seen += report.examples
    log.debug("DP: %d steps, q=%.4g, %d examples sampled", steps, q, seen)
    return loss_sum, seen, DPRound(cfg.effective_noise_multiplier, q, steps, population=population)


def dp_train_round(
    task: DPTask,
    model: SplitModel,
    cfg: TrainConfig,
    optimizers: list[torch.optim.Optimizer],
    rng: DPRandom,
    lookups: dict[str, list[np.ndarray]],
    ledger: PrivacyLedger | None = None,
) -> tuple[float, int, dict[str, float]]:
    """One organisation's DP round under recipe ``cfg`` (``cfg.dp``): budget check, steps, ledger entry.

    Parameters
    ----------
    task, model, optimizers, rng, lookups
        See :func:`dp_epochs`.
    cfg : TrainConfig
        The recipe: ``batch_size``, ``epochs`` and the ``dp_*`` group.
    ledger : PrivacyLedger, optional
        The organisation's ledger of earlier rounds, updated in place. None: a fresh one
        (then ``dp_epsilon`` covers this round only).

    Returns
    -------
    total : float
        Mean training loss times steps (what :func:`fedembed.train.train_local` divides by steps).
    steps : int
        DP steps run.
    stats : dict[str, float]
        ``dp_epsilon`` (all rounds in the ledger), ``dp_delta``, ``dp_noise_multiplier``
        (the effective one), ``dp_sampling_rate``, ``dp_steps``.

    Raises
    ------
    fedembed.dp.BudgetExhausted
        Before any step, when this round would take epsilon past ``cfg.dp_target_epsilon``.
    """
    dpc = DPConfig(cfg.dp_noise_multiplier, cfg.dp_clip, cfg.dp_selection_noise_multiplier, cfg.dp_row_threshold,
                   cfg.dp_count_clip, cfg.dp_unit)
    if ledger is None:
        ledger = PrivacyLedger(cfg.dp_target_delta, cfg.dp_target_epsilon or None)
    n = int(task.num_examples("train"))
    if n < 1:
        raise DPError("DP training needs at least one training example")
    population = len(np.unique(privacy_units(task))) if dpc.unit == "user" else n
    planned = DPRound(dpc.effective_noise_multiplier, min(1.0, cfg.batch_size / n),
                      int(cfg.epochs) * math.ceil(n / cfg.batch_size), population=population)
    ledger.check_next(planned)
    loss_sum, seen, ran = dp_epochs(task, model, dpc, cfg.batch_size, cfg.epochs, optimizers, rng, lookups)
    ledger.record(ran)
    eps, delta = ledger.spent()
    log.info("DP round: %d steps, effective noise multiplier %.3f, q=%.4g; epsilon %.3f at delta %g so far",
             ran.steps, ran.noise_multiplier, ran.sampling_rate, eps, delta)
    stats = {"dp_epsilon": eps, "dp_delta": delta, "dp_noise_multiplier": ran.noise_multiplier,
             "dp_sampling_rate": ran.sampling_rate, "dp_steps": float(ran.steps)}
    return loss_sum / max(seen, 1) * ran.steps, ran.steps, stats
