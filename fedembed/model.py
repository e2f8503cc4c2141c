"""Split a torch model into shared embedding tables and a private head.

A user keeps writing plain torch. They wrap their model in :class:`SplitModel` and name the
submodules that are shared tables (``nn.Embedding`` or ``nn.EmbeddingBag``); every other
parameter is the organisation's private head. Shared tables are switched to sparse
gradients, so one backward pass tells exactly which rows a batch touched.

Example
-------
>>> import torch.nn as nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.people = nn.EmbeddingBag(1000, 16, mode="mean")
...         self.out = nn.Linear(16, 3)
...     def forward(self, ids, offsets):
...         return self.out(self.people(ids, offsets))
>>> split = SplitModel(Net(), tables=["people"])
>>> sorted(split.table_shapes())
['people']
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedembed.errors import FedembedError
from fedembed.residual import ResidualTable

log = logging.getLogger(__name__)

TableModule = nn.Embedding | nn.EmbeddingBag


class SplitError(FedembedError, ValueError):
    """The model cannot be split as asked."""


class SplitModel(nn.Module):
    """A torch model whose named embedding tables are shared and the rest private.

    Parameters
    ----------
    module : nn.Module
        The user's model. Its ``forward`` is called unchanged.
    tables : Iterable[str] or Mapping[str, str]
        Dotted submodule paths of the shared tables (``"people"``, ``"enc.codes"``). A
        mapping gives each table a federation-wide name different from its module path
        (``{"people": "enc.people_emb"}``), so organisations whose models are laid out
        differently still share one table.

    Raises
    ------
    SplitError
        A named submodule is missing or is not an ``nn.Embedding``/``nn.EmbeddingBag``.
    """

    def __init__(self, module: nn.Module, tables: Iterable[str] | Mapping[str, str]) -> None:
        super().__init__()
        self.module = module
        pairs = dict(tables) if isinstance(tables, Mapping) else {t: t for t in tables}
        if not pairs:
            raise SplitError("name at least one shared embedding table")
        submodules = dict(module.named_modules())
        self._paths: dict[str, str] = {}
        for name, path in pairs.items():
            sub = submodules.get(path)
            if sub is None:
                raise SplitError(
                    f"table {name!r}: the model has no submodule {path!r}; "
                    f"embedding submodules are {self._embedding_paths(module)}"
                )
            if not isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
                raise SplitError(
                    f"table {name!r}: submodule {path!r} is {type(sub).__name__}, "
                    "expected nn.Embedding or nn.EmbeddingBag"
                )
            if getattr(sub, "max_norm", None) is not None:
                raise SplitError(f"table {name!r}: max_norm renormalises rows in place; not supported")
            if not sub.sparse:
                log.debug("table %s: switching %s to sparse gradients", name, path)
                sub.sparse = True
            self._paths[name] = path
        self._table_params = {id(self.table(n).weight) for n in self._paths}

    @staticmethod
    def _embedding_paths(module: nn.Module) -> list[str]:
        return [p for p, m in module.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]

    def forward(self, *args, **kwargs):  # noqa: D102 - forwards to the wrapped module
        return self.module(*args, **kwargs)

    @property
    def table_names(self) -> list[str]:
        """Federation-wide names of the shared tables, sorted."""
        return sorted(self._paths)

    def table(self, name: str) -> TableModule:
        """The embedding module of shared table ``name``."""
        mod = self.module.get_submodule(self._paths[name])
        return mod.shared if isinstance(mod, ResidualTable) else mod  # type: ignore[return-value]

    def add_residuals(self) -> None:
        """Give every shared table a private zero-initialised residual (see :mod:`fedembed.residual`).

        The residuals are head state: saved with :meth:`head_state_dict`, never uploaded,
        and trained by the sparse table optimizer (:meth:`sparse_parameters`).
        """
        for name, path in self._paths.items():
            mod = self.module.get_submodule(path)
            if isinstance(mod, ResidualTable):
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = self.module.get_submodule(parent_path) if parent_path else self.module
            setattr(parent, attr, ResidualTable(mod))

    def residual_parameters(self) -> list[nn.Parameter]:
        """Weights of the private residual tables (empty without :meth:`add_residuals`)."""
        out = []
        for path in self._paths.values():
            mod = self.module.get_submodule(path)
            if isinstance(mod, ResidualTable):
                out.append(mod.residual.weight)
        return out

    def table_shapes(self) -> dict[str, tuple[int, int]]:
        """``(rows, dim)`` of every shared table."""
        return {n: tuple(self.table(n).weight.shape) for n in self.table_names}  # type: ignore[misc]

    def table_parameters(self) -> list[nn.Parameter]:
        """The weights of the shared tables."""
        return [self.table(n).weight for n in self.table_names]

    def head_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter that is not a shared table: the private head (residuals included)."""
        return [(n, p) for n, p in self.module.named_parameters() if id(p) not in self._table_params]

    def head_parameters(self) -> list[nn.Parameter]:
        """Dense parameters of the private head (what the head's optimizer trains)."""
        residual = {id(p) for p in self.residual_parameters()}
        return [p for _, p in self.head_named_parameters() if id(p) not in residual]

    def _table_keys(self) -> set[str]:
        keys = set()
        for path in self._paths.values():
            mod = self.module.get_submodule(path)
            keys.add(f"{path}.shared.weight" if isinstance(mod, ResidualTable) else f"{path}.weight")
        return keys

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the private head (parameters, buffers, residuals), without the tables."""
        table_keys = self._table_keys()
        return {k: v for k, v in self.module.state_dict().items() if k not in table_keys}

    def load_head_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a state saved by :meth:`head_state_dict`."""
        missing, unexpected = self.module.load_state_dict(dict(state), strict=False)
        table_keys = self._table_keys()
        missing = [k for k in missing if k not in table_keys]
        if missing or unexpected:
            raise SplitError(f"head state does not fit the model: missing {missing}, unexpected {unexpected}")

    def get_tables(self) -> dict[str, np.ndarray]:
        """Copies of the shared tables as float32 numpy arrays."""
        return {n: self.table(n).weight.detach().cpu().numpy().copy() for n in self.table_names}

    @torch.no_grad()
    def set_tables(self, tables: Mapping[str, np.ndarray]) -> None:
        """Overwrite the shared tables (shapes must match)."""
        for name, arr in tables.items():
            w = self.table(name).weight
            if tuple(arr.shape) != tuple(w.shape):
                raise SplitError(f"table {name!r}: got shape {arr.shape}, model has {tuple(w.shape)}")
            w.copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
