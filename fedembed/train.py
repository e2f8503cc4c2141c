"""Local training of one organisation: sparse table updates plus its private head.

One call of :func:`train_local` is an organisation's share of a round: optionally re-fit
the head on the fresh table (FedRep-style), then train table and head together with
sparse embedding gradients, counting how many lookups hit each row. What comes out is the
row-sparse delta of the touched rows with their (capped) lookup counts as weights; the
head and its optimizer state stay with the caller, who keeps them private.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from fedembed.cooc import cooccurrence_loss
from fedembed.model import SplitModel
from fedembed.sparse import RowUpdate, TableUpdate
from fedembed.task import Task

log = logging.getLogger(__name__)

TABLE_OPTIMIZERS = ("sparse_adam", "sgd")


@dataclass
class TrainConfig:
    """The local training recipe; sent by the coordinator, the same for every organisation.

    The defaults were chosen on the validation splits of the movies task (5 orgs, 10
    rounds; see ``simulations/evaluate.py`` and the README): small batches, Adam state of
    touched rows kept across rounds, learning rates decayed by 0.8 per round (the models
    overfit within a few rounds otherwise), the guard with its blend on, no FedRep head
    re-fit, no residual and no co-occurrence objective (both measured lower on validation).

    Parameters
    ----------
    epochs : int
        Local epochs over the organisation's training data per round (table and head).
    head_epochs : int
        Epochs re-fitting only the head on the freshly synced table before the table is
        touched (FedRep-style); 0 disables it.
    batch_size : int
        Examples per local step.
    table_lr : float
        Learning rate of the local table optimizer.
    head_lr : float
        Learning rate of the head's Adam optimizer (its state persists across rounds).
    table_optimizer : str
        ``sparse_adam`` or ``sgd`` (both update only the rows a batch touched).
    max_row_weight : float
        Cap on a row's weight (its lookup count) in the per-row weighted mean.
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
    guard_window : int
        Evaluations whose validation scores the guard averages before choosing.
    guard_blend : bool
        Let the guard also serve the mean of the shared model's and the twin's outputs.
    head_weight_decay : float
        Decoupled weight decay of the head's optimizer (AdamW); 0 is plain Adam.
    lr_decay : float
        Per-round decay of both learning rates: round ``r`` (1-based) trains with
        ``lr * lr_decay ** (r - 1)`` (see :meth:`at_round`); 1 keeps them constant.
    """

    epochs: int = 1
    head_epochs: int = 0
    batch_size: int = 16
    table_lr: float = 0.05
    head_lr: float = 0.01
    table_optimizer: str = "sparse_adam"
    max_row_weight: float = 100.0
    cooc_weight: float = 0.0
    cooc_negatives: int = 4
    keep_table_state: bool = True
    residual: bool = False
    guard: bool = True
    guard_window: int = 3
    guard_blend: bool = True
    head_weight_decay: float = 0.0
    lr_decay: float = 0.8

    def __post_init__(self) -> None:
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table_optimizer must be one of {TABLE_OPTIMIZERS}, got {self.table_optimizer!r}")
        for f in ("epochs", "head_epochs", "batch_size", "guard_window"):
            if int(getattr(self, f)) < (1 if f != "head_epochs" else 0):
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if not (self.table_lr > 0 and self.head_lr > 0 and self.max_row_weight >= 1):
            raise ValueError("learning rates must be > 0 and max_row_weight >= 1")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.head_weight_decay < 0:
            raise ValueError(f"head_weight_decay must be >= 0, got {self.head_weight_decay}")

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


def make_head_optimizer(model: SplitModel, cfg: TrainConfig, state: dict | None) -> torch.optim.Optimizer:
    """The head's Adam optimizer, resumed from ``state`` when given."""
    opt = torch.optim.AdamW(model.head_parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    if state:
        opt.load_state_dict(state)
        for g in opt.param_groups:
            g["lr"] = cfg.head_lr
    return opt


def _table_optimizer(model: SplitModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.table_parameters() + model.residual_parameters()
    if cfg.table_optimizer == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=cfg.table_lr)
    return torch.optim.SGD(params, lr=cfg.table_lr)


def _load_table_state(opt: torch.optim.Optimizer, model: SplitModel, saved: dict[str, Any]) -> None:
    """Seed a SparseAdam's moments with the rows saved by :func:`_save_table_state`."""
    if not isinstance(opt, torch.optim.SparseAdam) or not saved:
        return
    for name in model.table_names:
        if name not in saved:
            continue
        w = model.table(name).weight
        ids = saved[name]["ids"]
        exp_avg, exp_avg_sq = torch.zeros_like(w), torch.zeros_like(w)
        exp_avg[ids] = saved[name]["exp_avg"]
        exp_avg_sq[ids] = saved[name]["exp_avg_sq"]
        opt.state[w] = {"step": int(saved["step"]), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _save_table_state(opt: torch.optim.Optimizer, model: SplitModel, saved: dict[str, Any]) -> None:
    """Keep the moments of the rows touched so far (this round's win over older ones)."""
    if not isinstance(opt, torch.optim.SparseAdam):
        return
    for name in model.table_names:
        st = opt.state.get(model.table(name).weight)
        if not st:
            continue
        nonzero = torch.nonzero(st["exp_avg_sq"].abs().sum(1) > 0).squeeze(1)
        saved[name] = {"ids": nonzero, "exp_avg": st["exp_avg"][nonzero], "exp_avg_sq": st["exp_avg_sq"][nonzero]}
        saved["step"] = int(st["step"])


def _record_lookups(model: SplitModel, lookups: dict[str, list[np.ndarray]]) -> None:
    """Append the row ids the last backward pass looked up (with repeats) per table."""
    for name in model.table_names:
        grad = model.table(name).weight.grad
        if grad is None:
            continue
        idx = grad._indices()[0].numpy() if grad.is_sparse else np.flatnonzero(grad.abs().sum(1).numpy())
        lookups[name].append(idx.copy())


def train_local(
    task: Task,
    model: SplitModel,
    org: int,
    cfg: TrainConfig,
    head_opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    start_tables: dict[str, np.ndarray] | None = None,
    table_state: dict[str, Any] | None = None,
) -> tuple[RowUpdate, dict[str, float]]:
    """Train ``model`` on ``org``'s training data for one round.

    Parameters
    ----------
    task : Task
        The task (data, loss).
    model : SplitModel
        The organisation's model, its tables set to the synced global version.
    org : int
        Organisation index.
    cfg : TrainConfig
        The recipe.
    head_opt : torch.optim.Optimizer
        The head's optimizer (its state is the organisation's, kept across rounds).
    rng : np.random.Generator
        Shuffles batches.
    start_tables : dict[str, np.ndarray], optional
        The tables the model starts from (the synced global version); the update is the
        difference to them. None (the ``local`` baseline): no update is computed.
    table_state : dict, optional
        The organisation's saved table optimizer state (``cfg.keep_table_state``);
        loaded before and updated in place after training.

    Returns
    -------
    update : RowUpdate
        Per table: sorted touched row ids, their deltas (float32) and weights.
    stats : dict[str, float]
        ``examples`` (examples seen per epoch), ``loss`` (mean training loss), ``steps``.
    """
    model.train()
    for _ in range(cfg.head_epochs):  # FedRep: fit the head to the fresh table first
        for batch in task.batches(org, "train", cfg.batch_size, rng):
            head_opt.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            head_opt.step()

    table_opt = _table_optimizer(model, cfg)
    if table_state is not None:
        _load_table_state(table_opt, model, table_state)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    lookups: dict[str, list[np.ndarray]] = {n: [] for n in model.table_names}
    total, steps = 0.0, 0
    for _ in range(cfg.epochs):
        for batch in task.batches(org, "train", cfg.batch_size, rng):
            head_opt.zero_grad(set_to_none=True)
            table_opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            if cfg.cooc_weight > 0:
                for name, (ids, offsets) in task.id_bags(batch).items():
                    ssl = cooccurrence_loss(model.table(name).weight, ids, offsets, cfg.cooc_negatives, gen)
                    loss = loss + cfg.cooc_weight * ssl
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)}; lower the learning rates")
            loss.backward()
            _record_lookups(model, lookups)
            head_opt.step()
            table_opt.step()
            total += loss.item()
            steps += 1
    if table_state is not None:
        _save_table_state(table_opt, model, table_state)
    update: RowUpdate = {}
    if start_tables is not None:
        for name in model.table_names:
            seen = np.concatenate(lookups[name]) if lookups[name] else np.zeros(0, np.int64)
            ids, counts = np.unique(seen.astype(np.int64), return_counts=True)
            pad = getattr(model.table(name), "padding_idx", None)
            if pad is not None:
                keep = ids != pad
                ids, counts = ids[keep], counts[keep]
            new = model.table(name).weight.detach()[torch.from_numpy(ids)].numpy()
            delta = (new - start_tables[name][ids]).astype(np.float32)
            weight = np.minimum(counts, cfg.max_row_weight).astype(np.float32)
            update[name] = TableUpdate(ids=ids, delta=delta, weight=weight)
    stats = {
        "examples": float(task.num_examples(org, "train")),
        "loss": total / max(steps, 1),
        "steps": float(steps),
    }
    return update, stats
