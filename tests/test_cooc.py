"""The shared self-supervised co-occurrence objective."""

import torch

from fedembed.cooc import cooccurrence_loss


def test_training_on_cooccurrence_pulls_bag_mates_together():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 8) * 0.1)
    ids = torch.tensor([0, 1, 2, 10, 11, 12, 0, 2, 11, 12])
    offsets = torch.tensor([0, 3, 6, 8])  # {0,1,2}, {10,11,12}, {0,2}, {11,12}
    opt = torch.optim.SGD([w], lr=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        opt.zero_grad()
        cooccurrence_loss(w, ids, offsets, negatives=3, generator=g).backward()
        opt.step()
    e = torch.nn.functional.normalize(w.detach(), dim=1)
    within = (e[0] @ e[2] + e[11] @ e[12]) / 2
    across = (e[0] @ e[11] + e[2] @ e[12]) / 2
    assert within > 0.5 and across < within - 0.5


def test_gradient_touches_only_rows_of_the_batch():
    w = torch.nn.Parameter(torch.randn(50, 4))
    ids = torch.tensor([3, 7, 9, 3, 40])
    cooccurrence_loss(w, ids, torch.tensor([0, 3]), negatives=2).backward()
    assert w.grad.is_sparse
    assert set(w.grad.coalesce().indices()[0].tolist()) <= {3, 7, 9, 40}


def test_bags_of_one_id_give_a_zero_loss():
    w = torch.nn.Parameter(torch.randn(5, 2))
    loss = cooccurrence_loss(w, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert float(loss) == 0.0
