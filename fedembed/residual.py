"""A private per-organisation correction of a shared table.

:class:`ResidualTable` replaces a shared table module by ``shared(x) + residual(x)``,
where ``residual`` is the organisation's own table of the same shape, initialised at
zero and trained only on the rows it uses. The residual belongs to the head: it is saved
in the organisation's state and never uploaded. Where the shared table serves an
organisation's task poorly (another organisation's task dominates it), the residual
absorbs the difference without pulling the shared table away from everyone else.
Lookups are linear in the table for ``nn.Embedding`` and for ``nn.EmbeddingBag`` in
``sum``/``mean`` mode, so the sum of the two lookups equals a lookup in the sum.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualTable(nn.Module):
    """``shared(x) + residual(x)`` with a zero-initialised private residual.

    Parameters
    ----------
    shared : nn.Embedding or nn.EmbeddingBag
        The shared table module (kept as is).

    Raises
    ------
    ValueError
        For an ``nn.EmbeddingBag`` in ``max`` mode (not linear in the table).
    """

    def __init__(self, shared: nn.Embedding | nn.EmbeddingBag) -> None:
        super().__init__()
        if isinstance(shared, nn.EmbeddingBag) and shared.mode == "max":
            raise ValueError("a residual needs a table lookup linear in the table; EmbeddingBag mode 'max' is not")
        self.shared = shared
        rows, dim = shared.weight.shape
        if isinstance(shared, nn.EmbeddingBag):
            self.residual: nn.Module = nn.EmbeddingBag(rows, dim, mode=shared.mode, sparse=True)
        else:
            self.residual = nn.Embedding(rows, dim, padding_idx=shared.padding_idx, sparse=True)
        nn.init.zeros_(self.residual.weight)

    @property
    def weight(self) -> nn.Parameter:
        """The shared table's weight (what federates)."""
        return self.shared.weight

    def forward(self, *args, **kwargs) -> torch.Tensor:  # noqa: D102
        return self.shared(*args, **kwargs) + self.residual(*args, **kwargs)
