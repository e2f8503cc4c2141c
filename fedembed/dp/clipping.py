"""Per-example gradient norms and clipped sums for embedding lookups and a head of linear layers.

A per-example gradient of an embedding table is nonzero only on the rows the example looked
up, and there it is a sum of the gradients of the table's *outputs* at the example's
positions: for ``nn.Embedding``, row ``r`` of example ``b`` gets ``sum_{l: ids[b,l]=r}
dL_b/dout[b,l]``; for ``nn.EmbeddingBag`` (bag ``b`` = example ``b``) it gets
``coef * dL_b/dout[b]`` once per occurrence of ``r`` in the bag (``coef`` = 1 for ``sum``,
1/bag length for ``mean``, times the per-sample weight). So one backward pass of
``sum_b L_b`` *to the table outputs only* gives every example's row gradients as a list of
``(example, row, vector)`` triples, as long as the batch's lookups: never a dense
per-example table gradient, never even a dense batch one.

The head's per-example gradients come from the same backward pass: forward hooks keep each
``nn.Linear``'s input ``a`` and the pass gives its output gradient ``g``, and the example's
weight gradient is ``g_b a_b^T`` (summed over positions and calls), its bias gradient
``g_b`` (Opacus's approach; the head is small, so it is materialised per example).

Then each example's total norm over tables and head gives its clip factor
``min(1, clip / norm)``, and the clipped sums are formed from the same triples and outer
products: no second backward pass.

Requirements, checked (:class:`~fedembed.dp.DPError` otherwise): the per-example losses
``L_b`` depend on example ``b`` only (no batch norm; the task's ``example_losses`` must not
mix examples); every trainable head parameter is the weight or bias of an ``nn.Linear``;
every table output has one leading row per example; ``EmbeddingBag`` modes ``sum`` or
``mean``; no ``scale_grad_by_freq``. Gradients flowing into a table or a linear weight any
other way than through its module call are not seen, so they are never released either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedembed.dp import DPError
from fedembed.model import SplitModel

log = logging.getLogger(__name__)


@dataclass
class _TableCall:
    ids: torch.Tensor
    offsets: torch.Tensor | None
    per_sample_weights: torch.Tensor | None
    output: torch.Tensor


@dataclass
class _LinearCall:
    input: torch.Tensor
    output: torch.Tensor


@dataclass
class TableGrad:
    """One table's share of a clipped batch.

    Attributes
    ----------
    rows : torch.Tensor
        Sorted unique rows the batch looked up (int64).
    clipped_sum : torch.Tensor
        ``sum_b scale_b * grad_b`` on those rows, ``(len(rows), dim)``.
    pair_example : torch.Tensor
        Example of each distinct (example, row) pair (int64).
    pair_row : torch.Tensor
        Row of each pair (int64).
    """

    rows: torch.Tensor
    clipped_sum: torch.Tensor
    pair_example: torch.Tensor
    pair_row: torch.Tensor


@dataclass
class ClippedBatch:
    """Per-example norms and clipped gradient sums of one batch.

    Attributes
    ----------
    norms : torch.Tensor
        Each example's gradient norm over all tables and the head, before clipping, ``(B,)``.
    scale : torch.Tensor
        Each example's clip factor ``min(1, clip / norm)``, ``(B,)``.
    tables : dict[str, TableGrad]
        Per shared table (only tables the batch looked up).
    head : list[torch.Tensor]
        Clipped gradient sum of each of ``model.head_parameters()``, in that order.
    """

    norms: torch.Tensor
    scale: torch.Tensor
    tables: dict[str, TableGrad] = field(default_factory=dict)
    head: list[torch.Tensor] = field(default_factory=list)


def _head_linears(model: SplitModel) -> dict[int, nn.Linear]:
    """The head's linear layers, keyed by ``id`` of each of their parameters; refuses any other trainable parameter."""
    owners: dict[int, nn.Linear] = {}
    for mod in model.module.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise DPError(f"{type(mod).__name__} mixes the examples of a batch: no per-example gradients through it")
        if isinstance(mod, nn.Linear):
            for p in mod.parameters(recurse=False):
                owners[id(p)] = mod
    bad = [n for n, p in model.head_named_parameters()
           if p.requires_grad and id(p) not in owners and id(p) not in {id(q) for q in model.residual_parameters()}]
    if bad:
        raise DPError(f"per-example gradients are supported for nn.Linear head layers only; not for {bad}")
    if model.residual_parameters():
        raise DPError("the private residual is not supported under DP (its lookups would need clipping too)")
    return owners


class ExampleGradients:
    """Forward hooks on a :class:`SplitModel` that turn per-example losses into a :class:`ClippedBatch`.

    Use as a context manager around the forward pass::

        with ExampleGradients(model) as eg:
            losses = task_example_losses(model, batch)   # shape (B,)
            clipped = eg.clip(losses, clip=1.0)

    Parameters
    ----------
    model : SplitModel
        The organisation's model; its head must be linear layers (see the module docstring).
    """

    def __init__(self, model: SplitModel) -> None:
        self.model = model
        self._linear_of = _head_linears(model)
        self._linears = {id(m): m for m in self._linear_of.values()}
        self._tables: dict[str, list[_TableCall]] = {}
        self._linear_calls: dict[int, list[_LinearCall]] = {}
        self._handles: list[Any] = []
        for name in model.table_names:
            mod = model.table(name)
            if getattr(mod, "scale_grad_by_freq", False):
                raise DPError(f"table {name!r}: scale_grad_by_freq scales by batch counts; not supported under DP")
            if isinstance(mod, nn.EmbeddingBag) and mod.mode not in ("sum", "mean"):
                raise DPError(f"table {name!r}: EmbeddingBag mode {mod.mode!r}; DP supports sum and mean")

    def __enter__(self) -> ExampleGradients:
        self._tables = {n: [] for n in self.model.table_names}
        self._linear_calls = {k: [] for k in self._linears}
        for name in self.model.table_names:
            self._handles.append(self.model.table(name).register_forward_hook(self._table_hook(name), with_kwargs=True))
        for key, mod in self._linears.items():
            self._handles.append(mod.register_forward_hook(self._linear_hook(key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _table_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            ids = args[0] if args else kwargs["input"]
            offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
            psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
            self._tables[name].append(_TableCall(ids, offsets, psw, output))
        return hook

    def _linear_hook(self, key: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._linear_calls[key].append(_LinearCall(args[0], output))
        return hook

    # ------------------------------------------------------------------ per-example pieces

    def _table_triples(self, name: str, call: _TableCall, gout: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
        """``(example, row, grad)`` of every lookup of one call."""
        mod = self.model.table(name)
        ids = call.ids
        pad = mod.padding_idx
        if isinstance(mod, nn.Embedding):
            if ids.dim() == 0 or ids.shape[0] != batch:
                raise DPError(f"table {name!r}: ids of shape {tuple(ids.shape)} for {batch} examples; "
                              "DP needs one leading row of ids per example")
            ex = torch.arange(batch, device=ids.device).view(-1, *([1] * (ids.dim() - 1))).expand_as(ids).reshape(-1)
            rows, g = ids.reshape(-1), gout.reshape(-1, gout.shape[-1])
        else:  # EmbeddingBag: bag b is example b
            if ids.dim() == 2:
                n_bags, length = ids.shape
                bag = torch.arange(n_bags, device=ids.device).repeat_interleave(length)
                flat = ids.reshape(-1)
            else:
                starts = call.offsets[:-1] if mod.include_last_offset else call.offsets
                n_bags = starts.shape[0]
                flat = ids
                pos = torch.arange(flat.shape[0], device=ids.device)
                bag = torch.searchsorted(starts, pos, right=True) - 1
            if n_bags != batch:
                raise DPError(f"table {name!r}: {n_bags} bags for {batch} examples; DP needs one bag per example")
            real = torch.ones_like(flat, dtype=torch.bool) if pad is None else flat != pad
            coef = torch.ones(flat.shape[0], dtype=gout.dtype, device=gout.device)
            if mod.mode == "mean":
                lengths = torch.zeros(n_bags, dtype=gout.dtype, device=gout.device).index_add_(0, bag, real.to(gout.dtype))
                coef = coef / lengths.clamp(min=1)[bag]
            if call.per_sample_weights is not None:
                coef = coef * call.per_sample_weights.reshape(-1).to(gout.dtype)
            ex, rows, g = bag, flat, gout[bag] * coef[:, None]
        if pad is not None:
            keep = rows != pad
            ex, rows, g = ex[keep], rows[keep], g[keep]
        return ex, rows.long(), g

    def clip(self, losses: torch.Tensor, clip: float, units: torch.Tensor | None = None) -> ClippedBatch:
        """Per-example (or per-unit) norms, clip factors and clipped sums, from one backward pass to the module outputs.

        Parameters
        ----------
        losses : torch.Tensor
            Per-example losses ``(B,)`` of the forward pass run inside this context.
        clip : float
            L2 bound of each example's gradient (tables and head together), or of each
            unit's with ``units``.
        units : torch.Tensor, optional
            ``(B,)`` int64, each example's privacy unit numbered ``0..G-1`` (a user and all
            their records): a unit's gradient is the sum of its examples' and is clipped as
            one. The returned norms, scales and ``pair_example`` are then per unit.

        Returns
        -------
        ClippedBatch
        """
        if losses.dim() != 1:
            raise DPError(f"per-example losses must have shape (B,), got {tuple(losses.shape)}")
        if not clip > 0:
            raise DPError(f"clip must be > 0, got {clip}")
        examples = losses.shape[0]
        if units is not None:
            if units.shape != (examples,) or (examples and int(units.min()) < 0):
                raise DPError(f"privacy units must be one non-negative id per example, got shape {tuple(units.shape)}")
            units = units.to(losses.device)
        batch = int(units.max()) + 1 if units is not None and examples else examples
        table_calls = [(n, c) for n, calls in self._tables.items() for c in calls]
        linear_calls = [(k, c) for k, calls in self._linear_calls.items() for c in calls]
        outputs = [c.output for _, c in table_calls] + [c.output for _, c in linear_calls]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else ()
        device = losses.device
        norm2 = torch.zeros(batch, dtype=torch.float64, device=device)

        # tables: distinct (example, row) pairs, their summed gradients, and their norms
        per_table: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        pieces: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        for (name, call), g in zip(table_calls, grads[: len(table_calls)]):
            if g is None:
                continue
            ex, rows, gv = self._table_triples(name, call, g.detach(), examples)
            pieces.setdefault(name, []).append((units[ex] if units is not None else ex, rows, gv))
        for name, parts in pieces.items():
            rows_total = self.model.table(name).weight.shape[0]
            ex = torch.cat([p[0] for p in parts])
            rows = torch.cat([p[1] for p in parts])
            g = torch.cat([p[2] for p in parts])
            keys, inv = torch.unique(ex * rows_total + rows, return_inverse=True)
            pair_grad = torch.zeros(keys.shape[0], g.shape[1], dtype=g.dtype, device=device).index_add_(0, inv, g)
            pair_ex, pair_row = keys // rows_total, keys % rows_total
            norm2.index_add_(0, pair_ex, pair_grad.double().pow(2).sum(1))
            per_table[name] = (pair_ex, pair_row, pair_grad)

        # head: per-example linear weight and bias gradients (summed over positions and calls)
        per_param: dict[int, torch.Tensor] = {}
        for (key, call), g in zip(linear_calls, grads[len(table_calls):]):
            if g is None:
                continue
            mod = self._linears[key]
            a, g = call.input.detach(), g.detach()
            if a.shape[0] != examples:
                raise DPError(f"a head layer saw {a.shape[0]} rows for {examples} examples; DP needs one leading row per example")
            a3, g3 = a.reshape(examples, -1, a.shape[-1]), g.reshape(examples, -1, g.shape[-1])
            gw = torch.einsum("bto,bti->boi", g3, a3)
            gb = g3.sum(1)
            if units is not None:  # a unit's gradient: the sum of its examples'
                gw = torch.zeros((batch, *gw.shape[1:]), dtype=gw.dtype, device=device).index_add_(0, units, gw)
                gb = torch.zeros((batch, *gb.shape[1:]), dtype=gb.dtype, device=device).index_add_(0, units, gb)
            per_param[id(mod.weight)] = per_param.get(id(mod.weight), 0) + gw
            if mod.bias is not None:
                per_param[id(mod.bias)] = per_param.get(id(mod.bias), 0) + gb
        for pg in per_param.values():
            norm2 += pg.double().pow(2).reshape(batch, -1).sum(1)

        norms = norm2.sqrt()
        scale = torch.clamp(clip / norms.clamp(min=1e-30), max=1.0).to(losses.dtype)
        out = ClippedBatch(norms=norms, scale=scale)
        for name, (pair_ex, pair_row, pair_grad) in per_table.items():
            rows, inv = torch.unique(pair_row, return_inverse=True)
            summed = torch.zeros(rows.shape[0], pair_grad.shape[1], dtype=pair_grad.dtype, device=device)
            summed.index_add_(0, inv, pair_grad * scale[pair_ex, None])
            out.tables[name] = TableGrad(rows, summed, pair_ex, pair_row)
        for p in self.model.head_parameters():
            pg = per_param.get(id(p))
            out.head.append(torch.zeros_like(p) if pg is None else torch.einsum("b,b...->...", scale, pg))
        return out
