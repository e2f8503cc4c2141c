"""The shared self-supervised objective: ids that occur together are pulled together.

Every organisation optimises this same objective on its shared tables, whatever its own
supervised task, so the shared space means the same thing to every head. It is
word2vec's skip-gram with negative sampling, with the bag (the cast of a film, the codes
of a visit) as the context window: for every id in a bag, one other id of the same bag
is a positive and ``negatives`` ids drawn from the same batch are negatives. Negatives
come from the batch, so the objective touches no row the supervised loss does not: it
costs no extra upload.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cooccurrence_loss(
    weight: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    negatives: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Skip-gram negative-sampling loss over bags of ids.

    Parameters
    ----------
    weight : torch.Tensor
        The shared table ``(rows, dim)`` (a parameter; gradients flow sparsely).
    ids : torch.Tensor
        Concatenated ids of the bags, int64 ``(n,)``.
    offsets : torch.Tensor
        Start of each bag in ``ids``, int64 ``(bags,)``.
    negatives : int
        Negatives per positive pair.
    generator : torch.Generator, optional
        Source of the random pairing (deterministic runs).

    Returns
    -------
    torch.Tensor
        Scalar loss; zero (with a graph) when no bag has two ids.
    """
    n = ids.shape[0]
    if n == 0:
        return weight.sum() * 0.0
    ends = torch.cat([offsets[1:], torch.tensor([n], dtype=offsets.dtype)])
    lengths = ends - offsets
    bag = torch.repeat_interleave(torch.arange(offsets.shape[0]), lengths)
    pos_in_bag = torch.arange(n) - offsets[bag]
    length = lengths[bag]
    keep = length >= 2
    if not bool(keep.any()):
        return weight.sum() * 0.0
    anchor = torch.nonzero(keep).squeeze(1)
    shift = 1 + (torch.rand(anchor.shape[0], generator=generator) * (length[anchor] - 1).float()).long()
    partner = offsets[bag[anchor]] + (pos_in_bag[anchor] + shift) % length[anchor]
    neg = torch.randint(0, n, (anchor.shape[0], negatives), generator=generator)
    a = F.embedding(ids[anchor], weight, sparse=True)
    p = F.embedding(ids[partner], weight, sparse=True)
    q = F.embedding(ids[neg], weight, sparse=True)
    pos_logit = (a * p).sum(-1)
    neg_logit = torch.einsum("nd,nkd->nk", a, q)
    return -(F.logsigmoid(pos_logit).mean() + F.logsigmoid(-neg_logit).sum(1).mean())
