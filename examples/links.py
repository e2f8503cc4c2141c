"""Pairwise link prediction over a small shared node table: a task written from the README alone.

The evaluation's fourth scenario (``simulations/evaluate.py --scenarios link``), kept in
``examples/`` because it is written the way an organisation writes its own task: plain
torch, a ``SplitModel`` naming one shared table, and the ``Task`` methods the README lists.
It is unlike the built-in bag tasks on purpose: a table of a few hundred rows that every
organisation touches many times per epoch, and a head that reads two rows at once.

Data (generated, no download)
    ``nodes`` nodes with a hidden embedding ``z`` (dimension ``hidden``), the same in every
    organisation. Organisation ``org`` sees a random half of the nodes and labels ``pairs``
    random pairs of them: linked when ``z_u' A_k z_v > 0``, where
    ``A_k = (1 - own) I + own R_k`` and ``R_k`` is its own random matrix. ``own = 0``: every
    organisation labels links alike; ``own = 1``: only the nodes' embeddings are common.
    Pairs are split 70/10/20 into train/val/test.

Model
    ``nodes`` table (dimension ``dim``) shared; the head, an MLP on ``[e_u * e_v, e_u + e_v,
    |e_u - e_v|]``, private. Score: accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedembed import SplitModel, Task


class LinkNet(nn.Module):
    """A shared node table and a private head that scores a pair of nodes."""

    def __init__(self, nodes: int, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.nodes = nn.Embedding(nodes, dim)
        self.head = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        u, v = self.nodes(pairs[:, 0]), self.nodes(pairs[:, 1])
        return self.head(torch.cat([u * v, u + v, (u - v).abs()], 1)).squeeze(1)


class LinkTask(Task):
    """One organisation's link prediction (see the module docstring).

    Parameters
    ----------
    data : str, optional
        Unused (the data are generated).
    seed : int
        Seed of the nodes' embeddings (shared) and of this organisation's relation, nodes and pairs.
    nodes : int
        Rows of the shared table.
    org, orgs : int
        This organisation's index and how many there are (a simulation passes them).
    pairs : int
        Labelled pairs of this organisation (before the 70/10/20 split).
    hidden : int
        Dimension of the hidden node embeddings.
    own : float
        How much of an organisation's relation is its own, 0 to 1.
    dim : int
        Dimension of the shared table.
    """

    def __init__(self, data: str | None = None, seed: int = 0, nodes: int = 300, org: int = 0, orgs: int = 5,
                 pairs: int = 2000, hidden: int = 4, own: float = 0.3, dim: int = 16) -> None:
        super().__init__(data, seed)
        nodes, org, pairs, hidden, own = int(nodes), int(org), int(pairs), int(hidden), float(own)
        if nodes < 2 or pairs < 10 or hidden < 1 or not 0 <= own <= 1 or not 0 <= org < int(orgs):
            raise ValueError(f"need nodes >= 2, pairs >= 10, hidden >= 1, 0 <= own <= 1 and 0 <= org < orgs; got "
                             f"nodes={nodes}, pairs={pairs}, hidden={hidden}, own={own}, org={org}, orgs={orgs}")
        self.nodes, self.dim, self.own, self.name = nodes, int(dim), own, f"lab-{org}"
        world = np.random.default_rng([int(seed), 999])
        self._z = world.standard_normal((nodes, hidden))
        rng = np.random.default_rng([int(seed), org])
        self._relation = (1 - own) * np.eye(hidden) + own * rng.standard_normal((hidden, hidden))
        seen = rng.permutation(nodes)[: max(2, nodes // 2)]
        p = rng.choice(seen, (pairs, 2)).astype(np.int64)
        self.x, self.y = p, self.relation_labels(p)
        cut = int(0.7 * pairs), int(0.8 * pairs)
        self.splits = {"train": (0, cut[0]), "val": (cut[0], cut[1]), "test": (cut[1], pairs)}

    def relation_labels(self, pairs: np.ndarray) -> np.ndarray:
        """This organisation's label (1.0 linked, 0.0 not) of any ``(n, 2)`` node pairs."""
        s = np.einsum("ni,ij,nj->n", self._z[pairs[:, 0]], self._relation, self._z[pairs[:, 1]])
        return (s > 0).astype(np.float32)

    def build_model(self) -> SplitModel:
        return SplitModel(LinkNet(self.nodes, self.dim), tables=["nodes"])

    def num_examples(self, split: str) -> int:
        lo, hi = self.splits[split]
        return hi - lo

    def batches(self, split: str, batch_size: int, rng: np.random.Generator | None) -> Iterator[tuple]:
        lo, hi = self.splits[split]
        idx = lo + (rng.permutation(hi - lo) if rng is not None else np.arange(hi - lo))
        for s in range(0, len(idx), batch_size):
            j = idx[s:s + batch_size]
            yield torch.from_numpy(self.x[j]), torch.from_numpy(self.y[j])

    def loss(self, model: SplitModel, batch: tuple) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: SplitModel, split: str) -> dict[str, float]:
        x, y = next(self.batches(split, 10**9, None))
        logits = model(x.to(self.device)).cpu()
        return {"score": float(((logits > 0).float() == y).float().mean()),
                "loss": float(nn.functional.binary_cross_entropy_with_logits(logits, y))}
