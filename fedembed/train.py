"""Local training of one organisation: sparse table updates plus its private head.

One call of :func:`train_local` is an organisation's share of a round: optionally re-fit
the head on the fresh table (FedRep-style), then train table and head together with
sparse embedding gradients, counting how many lookups hit each row. What comes out is the
row-sparse delta of the touched rows with their (capped) lookup counts as weights; the
head and its optimizer state stay with the caller, who keeps them private.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Collection

import numpy as np
import torch

from fedembed.cooc import cooccurrence_loss
from fedembed.dp import BudgetExhausted
from fedembed.errors import FedembedError
from fedembed.model import SplitModel
from fedembed.normaliser import CLIP as NORMALISER_CLIP
from fedembed.normaliser import own_normaliser, widen
from fedembed.recipe import TrainConfig
from fedembed.sparse import RowUpdate, TableUpdate
from fedembed.task import Task, task_loss, task_metrics, to_device

log = logging.getLogger(__name__)


class NonFiniteError(FedembedError, FloatingPointError):
    """Training made a loss or the model's state non-finite (NaN or inf): nothing of that round may be kept or sent."""


_FINITE_CHUNK = 1 << 22
"""Elements checked at a time (a table of 10^6 rows is checked without a mask of its size)."""


def _all_finite(value: torch.Tensor | np.ndarray) -> bool:
    """Whether a float tensor or array holds no NaN and no infinity, checked a chunk of rows at a time."""
    isfinite = np.isfinite if isinstance(value, np.ndarray) else torch.isfinite
    if value.ndim == 0:
        return bool(isfinite(value).all())
    step = max(1, _FINITE_CHUNK // max(1, int(np.prod(value.shape[1:]))))
    return all(bool(isfinite(value[i:i + step]).all()) for i in range(0, value.shape[0], step))


def _nonfinite_in(value: Any, where: str, out: list[str]) -> None:
    """Append to ``out`` the paths under ``where`` of the tensors, arrays and floats of ``value`` holding NaN or inf."""
    if isinstance(value, torch.Tensor):
        if value.is_sparse:
            value = value.coalesce().values()
        if value.is_floating_point() and not _all_finite(value.detach()):
            out.append(where)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not _all_finite(value):
            out.append(where)
    elif isinstance(value, float):
        if not np.isfinite(value):
            out.append(where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _nonfinite_in(item, f"{where}.{key}" if where else str(key), out)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _nonfinite_in(item, f"{where}[{i}]", out)


def nonfinite_parts(**parts: Any) -> list[str]:
    """The entries of ``parts`` that hold a NaN or an infinity, by path (empty: all finite).

    Parameters
    ----------
    **parts : Any
        Named pieces of state: tensors, numpy arrays, floats and dicts or lists of them
        (a head's ``state_dict``, an optimizer's ``state_dict``, saved table moments).
        Anything else (integers, strings) is passed over.

    Returns
    -------
    list[str]
        Paths such as ``head.0.weight`` or ``optimizer.state.0.exp_avg``.
    """
    out: list[str] = []
    for name, value in parts.items():
        _nonfinite_in(value, name, out)
    return out


def check_finite(what: str, **parts: Any) -> None:
    """Refuse state holding a NaN or an infinity before it is kept or sent (see :func:`nonfinite_parts`).

    Parameters
    ----------
    what : str
        What produced the state (``the head re-fit``, ``local training``), for the message.
    **parts : Any
        The state, by name.

    Raises
    ------
    NonFiniteError
        Naming the parts that went non-finite (``head``, ``optimizer``, ``tables``...);
        the entries within them (the private head's parameter names) are logged here only.
    """
    bad = nonfinite_parts(**parts)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        log.error("%s made %s%s non-finite (NaN or inf)", what, bad[:5], more)
        kinds = sorted({p.split(".", 1)[0].split("[", 1)[0] for p in bad})
        raise NonFiniteError(f"{what} made its {', '.join(kinds)} non-finite (NaN or inf); nothing of it is kept or "
                             f"sent (a learning rate too high, or tables of extreme values)")


def model_state(model: SplitModel, head_opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The state :func:`check_finite` checks after training: the head (with residuals), its optimizer, every table."""
    state: dict[str, Any] = {"head": model.head_state_dict(),
                             "tables": {n: model.table(n).weight for n in model.table_names}}
    if head_opt is not None:
        state["optimizer"] = head_opt.state_dict()
    return state


def _derived_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and machines, unlike ``hash``)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def build_seeded(task: Task, seed: int, who: str) -> SplitModel:
    """``task.build_model()`` with torch seeded from the run's seed and the organisation's name.

    The same command gives the same initial head every time, whatever the task's own code
    does with torch's global generator; two organisations get different heads.
    """
    torch.manual_seed(_derived_seed("model", seed, who))
    return task.build_model()


def round_rng(seed: int, who: str, round_: int) -> np.random.Generator:
    """The organisation's shuffling generator for ``round_``; torch's generator is seeded alongside.

    Derived from the run's seed, the organisation's name and the round, so a run repeats
    exactly and no two organisations (nor two rounds) shuffle alike, deployed or simulated.
    """
    torch.manual_seed(_derived_seed("train", seed, who, round_))
    return np.random.default_rng(_derived_seed("shuffle", seed, who, round_))


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
        ids = ids.to(w.device)
        exp_avg[ids] = saved[name]["exp_avg"].to(w.device)
        exp_avg_sq[ids] = saved[name]["exp_avg_sq"].to(w.device)
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
        saved[name] = {"ids": nonzero.cpu(), "exp_avg": st["exp_avg"][nonzero].cpu(),
                       "exp_avg_sq": st["exp_avg_sq"][nonzero].cpu()}
        saved["step"] = int(st["step"])


def _record_lookups(model: SplitModel, lookups: dict[str, list[np.ndarray]]) -> None:
    """Append the row ids the last backward pass looked up (with repeats) per table."""
    for name in model.table_names:
        grad = model.table(name).weight.grad
        if grad is None:
            continue
        idx = grad._indices()[0].cpu().numpy() if grad.is_sparse else np.flatnonzero(grad.abs().sum(1).cpu().numpy())
        lookups[name].append(idx.copy())


def _grad_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a table's gradient touches (unique, sorted when sparse) and their gradients."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad._indices()[0], grad._values()
    ids = torch.nonzero(grad.abs().sum(1)).squeeze(1)
    return ids, grad[ids]


@torch.no_grad()
def _proximal_pull(model: SplitModel, start: dict[str, torch.Tensor], rate: float) -> None:
    """FedProx on the rows of the last step: move each toward its synced value by ``rate`` of the gap.

    A decoupled proximal step (like AdamW's decay, towards the round's start instead of 0)
    on the rows the last batch touched (those with a gradient): ``w[ids] -= rate * (w[ids] - start[ids])``.
    """
    for name, t0 in start.items():
        w = model.table(name).weight
        grad = w.grad
        if grad is None:
            continue
        ids = _grad_rows(grad)[0]
        w[ids] -= rate * (w[ids] - t0[ids])


@torch.no_grad()
def snapshot_tables(model: SplitModel, names: Collection[str]) -> dict[str, torch.Tensor]:
    """Copies of the tables ``names`` of ``model`` (the start of an epoch, for :func:`keep_share_of_move`)."""
    return {n: model.table(n).weight.detach().clone() for n in names}


@torch.no_grad()
def keep_share_of_move(model: SplitModel, start: dict[str, torch.Tensor], shares: dict[str, float]) -> None:
    """Move each table back to ``start + share * (now - start)``: the coordinator's step in one trajectory.

    ``pooled`` and ``local`` (and only they) call it after each epoch with
    :meth:`fedembed.aggregate.ServerOptimizer.kept_shares`, so a table the coordinator
    steps by half its sum keeps half of the epoch's move there too.
    """
    for name, t0 in start.items():
        w = model.table(name).weight
        w.copy_(t0 + shares[name] * (w - t0))


def head_steps(task: Task, cfg: TrainConfig) -> int:
    """Steps of the FedRep head re-fit: ``cfg.head_epochs`` times the batches of an epoch, rounded up (0: none)."""
    if not cfg.head_epochs > 0:
        return 0
    batches = -(-task.num_examples("train") // cfg.batch_size)
    return max(1, int(np.ceil(cfg.head_epochs * batches - 1e-9)))


def fit_head(task: Task, model: SplitModel, cfg: TrainConfig, head_opt: torch.optim.Optimizer, rng: np.random.Generator) -> None:
    """FedRep: re-fit only the head, ``cfg.head_epochs`` epochs, on the tables as they are (frozen).

    An organisation calls it on the freshly synced tables before it evaluates them, so the
    head it evaluates and serves is fitted to the very tables it is served with (not to
    its own pre-averaging tables of the previous round). A fractional ``head_epochs``
    stops after that share of a shuffled epoch's batches (:func:`head_steps`).

    Raises
    ------
    NonFiniteError
        A loss became non-finite (tables or a head holding NaN or inf, a step too large),
        or the re-fit left the head or its optimizer state non-finite. The caller keeps
        nothing of it: its saved head is what it was.
    """
    steps = head_steps(task, cfg)
    if steps == 0:
        return
    frozen = model.table_parameters() + model.residual_parameters()
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.train()
    try:
        done = 0
        while done < steps:
            for batch in task.batches("train", cfg.batch_size, rng):
                batch = to_device(batch, task.device)
                head_opt.zero_grad(set_to_none=True)
                loss = task_loss(task, model, batch)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteError(f"the head re-fit's loss became {float(loss.detach())} (non-finite) at step "
                                         f"{done + 1}: the tables or the head hold non-finite values, or the learning "
                                         "rate is too high; nothing of it is kept")
                loss.backward()
                head_opt.step()
                done += 1
                if done == steps:
                    break
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    check_finite("the head re-fit", head=model.head_state_dict(), optimizer=head_opt.state_dict())


class _GradSquares:
    """Per table, the rows' steps and sums of squared gradients over one local epoch (the pooled normaliser's input).

    Kept sparse: each step's rows and squared gradients are appended, and merged into one
    coalesced sparse sum every :attr:`MERGE` steps, so memory follows the rows touched,
    never the table's size.
    """

    MERGE = 64

    def __init__(self, model: SplitModel, tables: Collection[str]) -> None:
        self.model = model
        self.parts: dict[str, list[torch.Tensor]] = {n: [] for n in model.table_names if n in tables}
        self.pending = 0

    def add(self) -> None:
        """Take the squared gradients of the last backward pass (one step per row that has a gradient)."""
        for name in self.parts:
            weight = self.model.table(name).weight
            grad = weight.grad
            if grad is None:
                continue
            ids, values = _grad_rows(grad)
            ones = torch.ones(ids.shape[0], 1, dtype=values.dtype, device=values.device)
            rows = torch.cat([values.detach() ** 2, ones], dim=1)  # squared gradients, then the step count
            self.parts[name].append(torch.sparse_coo_tensor(ids[None], rows, (weight.shape[0], rows.shape[1]),
                                                            check_invariants=False))
        self.pending += 1
        if self.pending >= self.MERGE:
            for name, parts in self.parts.items():
                if len(parts) > 1:
                    self.parts[name] = [_sparse_sum(parts)]
            self.pending = 0

    def of(self, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sq, steps)`` of rows ``ids`` of table ``name``: float64 ``(len(ids), dim)`` and ``(len(ids),)``."""
        dim = self.model.table(name).weight.shape[1]
        parts = self.parts[name]
        if not parts:
            return np.zeros((ids.size, dim)), np.zeros(ids.size)
        total = _sparse_sum(parts)
        rows = total._indices()[0].cpu().numpy()
        values = total._values().detach().cpu().numpy().astype(np.float64)
        pos = np.minimum(np.searchsorted(rows, ids), max(rows.size - 1, 0))
        found = rows[pos] == ids if rows.size else np.zeros(ids.size, dtype=bool)
        out = np.zeros((ids.size, dim + 1))
        out[found] = values[pos[found]]
        return out[:, :dim], out[:, dim]


def _sparse_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The coalesced sum of sparse tensors of one shape."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total.coalesce()


def train_local(
    task: Task,
    model: SplitModel,
    cfg: TrainConfig,
    head_opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    start_tables: dict[str, np.ndarray] | None = None,
    table_state: dict[str, Any] | None = None,
    dp_ledger: Any | None = None,
    fit_head_first: bool = True,
    dp_random: Any | None = None,
    delta_clip: float | None = None,
) -> tuple[RowUpdate, dict[str, float]]:
    """Train ``model`` on the organisation's training data for one round.

    Parameters
    ----------
    task : Task
        The organisation's task (data, loss); batches are moved to ``task.device``.
    model : SplitModel
        The organisation's model on ``task.device``, its tables set to the synced global version.
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
    dp_ledger : fedembed.dp.accounting.PrivacyLedger, optional
        With ``cfg.dp``: the organisation's privacy ledger, checked against its budget
        before training and updated after (None: this round's epsilon only).
    fit_head_first : bool
        Start with :func:`fit_head` (``cfg.head_epochs``); False when the caller has
        already re-fitted the head on these tables (before evaluating them).
    dp_random : fedembed.dp.noise.SecureRandom, optional
        With ``cfg.dp``: the secret source of every DP random choice (Poisson sampling,
        row selection, noise); None: a fresh random key (unrepeatable). ``rng`` is never
        used for them: it derives from the run's seed, which the coordinator knows.
    delta_clip : float, optional
        The round's delta clip; the upload of every table ``cfg.pooled_tables`` names
        (required then) is widened to ``[delta sqrt(v / V), clip v / V]``
        (:func:`fedembed.normaliser.widen`) with the organisation's own normaliser ``v``.

    Returns
    -------
    update : RowUpdate
        Per table: sorted touched row ids, their deltas (float32) and weights.
    stats : dict[str, float]
        ``examples`` (examples seen per epoch), ``loss`` (mean training loss), ``steps``.

    Raises
    ------
    NonFiniteError
        A loss became non-finite, or training left the head, its optimizer state, a table
        or the kept table moments non-finite: ``table_state`` is left as it was, and the
        caller keeps and sends nothing of the round.
    """
    pooled: frozenset[str] = frozenset()
    if start_tables is not None:
        pooled = cfg.pooled_tables({n: tuple(model.table(n).weight.shape) for n in model.table_names})
    if pooled and not (delta_clip is not None and delta_clip > 0):
        raise ValueError("the pooled normaliser widens the upload to the round's delta clip: pass delta_clip > 0")
    model.train()
    if fit_head_first:
        fit_head(task, model, cfg, head_opt, rng)
    squares = _GradSquares(model, pooled) if pooled else None

    table_opt = _table_optimizer(model, cfg)
    if table_state is not None:
        _load_table_state(table_opt, model, table_state)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    lookups: dict[str, list[np.ndarray]] = {n: [] for n in model.table_names}
    prox: dict[str, torch.Tensor] = {}
    if cfg.prox_mu > 0 and start_tables is not None:
        prox = {n: torch.from_numpy(start_tables[n]).to(model.table(n).weight.device) for n in model.table_names}
    rate = min(cfg.prox_mu * cfg.table_lr, 1.0)
    total, steps = 0.0, 0
    dp_stats: dict[str, float] | None = None
    if cfg.dp:  # record-level DP (fedembed.dp.local): own Poisson samples; lookups get the rows each step released
        from fedembed.dp.local import dp_train_round
        from fedembed.dp.noise import SecureRandom

        total, steps, dp_stats = dp_train_round(task, model, cfg, [head_opt, table_opt], dp_random or SecureRandom.fresh(),
                                                lookups, dp_ledger)
    for _ in range(cfg.epochs if dp_stats is None else 0):
        for batch in task.batches("train", cfg.batch_size, rng):
            batch = to_device(batch, task.device)
            head_opt.zero_grad(set_to_none=True)
            table_opt.zero_grad(set_to_none=True)
            loss = task_loss(task, model, batch)
            if cfg.cooc_weight > 0:
                for name, (ids, offsets) in task.id_bags(batch).items():
                    ssl = cooccurrence_loss(model.table(name).weight, ids, offsets, cfg.cooc_negatives, gen)
                    loss = loss + cfg.cooc_weight * ssl
            if not torch.isfinite(loss.detach()):
                raise NonFiniteError(f"training loss became {float(loss.detach())} (non-finite); nothing of it is kept "
                                     "or sent: lower the learning rates")
            loss.backward()
            _record_lookups(model, lookups)
            if squares is not None:
                squares.add()
            if not cfg.freeze_head:
                head_opt.step()
            table_opt.step()
            if prox:
                _proximal_pull(model, prox, rate)
            total += loss.item()
            steps += 1
    # a step may leave the state non-finite with every loss finite (a huge learning rate, the last step)
    check_finite("local training", **model_state(model, head_opt))
    if table_state is not None:
        moments: dict[str, Any] = {}
        _save_table_state(table_opt, model, moments)
        check_finite("local training", table_state=moments)
        table_state.update(moments)
    update: RowUpdate = {}
    if start_tables is not None:
        for name in model.table_names:
            seen = np.concatenate(lookups[name]) if lookups[name] else np.zeros(0, np.int64)
            ids, counts = np.unique(seen.astype(np.int64), return_counts=True)
            pad = getattr(model.table(name), "padding_idx", None)
            if pad is not None:
                keep = ids != pad
                ids, counts = ids[keep], counts[keep]
            w = model.table(name).weight.detach()
            new = w[torch.from_numpy(ids).to(w.device)].cpu().numpy()
            delta = (new - start_tables[name][ids]).astype(np.float32)
            weight = np.minimum(counts, cfg.max_row_weight).astype(np.float32)
            if squares is not None and name in pooled:
                v, clipped = own_normaliser(*squares.of(name, ids))
                if clipped:
                    log.info("table %r: %d normaliser entries above %g x the organisation's mean were clipped",
                             name, clipped, NORMALISER_CLIP)
                delta, clipped = widen(delta, v, float(delta_clip))
                if clipped:  # clipped here, so the sum finds none to warn of
                    log.warning("table %r: %d delta entries beyond +-%g were clipped", name, clipped, delta_clip)
            update[name] = TableUpdate(ids=ids, delta=delta, weight=weight)
    stats = {
        "examples": float(task.num_examples("train")),
        "loss": total / max(steps, 1),
        "steps": float(steps),
        **(dp_stats or {}),
    }
    return update, stats


def train_alone(
    task: Task, model: SplitModel, cfg: TrainConfig, saved: dict[str, Any] | None, seed: int, who: str, round_: int,
    keep: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One round of an organisation training on its own (its own tables and head, nothing uploaded).

    This is the ``local`` baseline (:mod:`fedembed.baselines.local`) and the guard's private
    twin (:mod:`fedembed.guard`): both call it, so the twin *is* the baseline.

    Parameters
    ----------
    task : Task
        The organisation's task.
    model : SplitModel
        Its model (own tables, own head), trained in place.
    cfg : TrainConfig
        The recipe of this round (the private residual is never used: the table is private already).
    saved : dict or None
        What the previous call returned (None in round 1).
    seed, who, round_ : int, str, int
        Run seed, organisation name and round (:func:`round_rng`).
    keep : dict, optional
        Table -> share of the epoch's move it keeps (:func:`keep_share_of_move`; the
        ``local`` baseline passes the coordinator's step,
        :meth:`fedembed.aggregate.ServerOptimizer.kept_shares`). None: the whole move.

    Returns
    -------
    dict
        ``head``, ``optimizer`` (the head optimizer's state) and, with
        ``cfg.keep_table_state``, ``table_state``: what the next round resumes from.
    """
    head_opt = make_head_optimizer(model, cfg, saved["optimizer"] if saved else None)
    table_state: dict[str, Any] | None = (saved or {}).get("table_state", {}) if cfg.keep_table_state else None
    alone = TrainConfig.from_dict({**cfg.to_dict(), "residual": False})
    ledger, dp_random = None, None
    if alone.dp:  # the local baseline with the federation's DP: its spend composed over its rounds
        from fedembed.dp.accounting import PrivacyLedger
        from fedembed.dp.noise import SecureRandom, noise_secret

        ledger = PrivacyLedger(alone.dp_target_delta, alone.dp_target_epsilon or None).resume((saved or {}).get("dp_ledger"))
        # it releases nothing: its noise may repeat from the run's seed (reproducible baselines)
        dp_random = SecureRandom.derive(noise_secret(None, f"alone/{seed}"), "record", who, round_)
    keep = keep or {}
    start = snapshot_tables(model, keep)
    try:
        train_local(task, model, alone, head_opt, round_rng(seed, who, round_), start_tables=None,
                    table_state=table_state, dp_ledger=ledger, dp_random=dp_random)
        keep_share_of_move(model, start, keep)
    except BudgetExhausted as exc:
        log.warning("%s: %s", who, exc)
        return dict(saved or {"head": model.head_state_dict(), "optimizer": head_opt.state_dict()})
    out: dict[str, Any] = {"head": model.head_state_dict(), "optimizer": head_opt.state_dict()}
    if table_state is not None:
        out["table_state"] = table_state
    if ledger is not None:
        out["dp_ledger"] = ledger.to_dict()
    return out


def evaluate_splits(task: Task, model: torch.nn.Module) -> dict[str, float]:
    """The task's metrics on validation (``val_<name>``) and test (``<name>``)."""
    out: dict[str, float] = {}
    was_training = model.training
    for split, prefix in (("val", "val_"), ("test", "")):
        for k, v in task_metrics(task, model, split).items():
            out[prefix + k] = v
    model.train(was_training)
    return out
