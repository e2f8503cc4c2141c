"""Your own model and data: one organisation's task.

    fedembed simulate --task examples/my_task.py:ClicksTask --orgs 3

An organisation runs it on its own data with ``fedembed client --task examples/my_task.py:ClicksTask``;
the simulation also passes ``org`` and ``orgs`` (this stand-in data set makes each
organisation's data from them).
"""
import numpy as np
import torch
from torch import nn

from fedembed import SplitModel, Task


class Net(nn.Module):  # plain torch: a shared product table and a private head
    def __init__(self, products: int, dim: int = 16):
        super().__init__()
        self.products = nn.Embedding(products, dim)
        self.head = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids):  # ids: (batch, items in basket)
        return self.head(self.products(ids).mean(1)).squeeze(1)


class ClicksTask(Task):
    SPLITS = {"train": (0, 400), "val": (400, 500), "test": (500, 600)}

    def __init__(self, data=None, seed=0, products=5000, org=0, orgs=1):
        super().__init__(data, seed)
        self.products, self.name = products, f"shop-{org}"
        rng = np.random.default_rng([seed, org])  # stand-in for this organisation's own files
        self.x, self.y = rng.integers(0, products, (600, 5)), rng.random(600) < 0.3

    def build_model(self): return SplitModel(Net(self.products), tables=["products"])
    def num_examples(self, split): return self.SPLITS[split][1] - self.SPLITS[split][0]

    def batches(self, split, batch_size, rng):
        lo, hi = self.SPLITS[split]
        idx = lo + (rng.permutation(hi - lo) if rng is not None else np.arange(hi - lo))
        for s in range(0, len(idx), batch_size):
            yield torch.from_numpy(self.x[idx[s:s + batch_size]]), torch.from_numpy(self.y[idx[s:s + batch_size]] * 1.0).float()

    def loss(self, model, batch): return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model, split):
        hits = [((model(x.to(self.device)) > 0).float().cpu() == y).float().mean() for x, y in self.batches(split, 10**6, None)]
        return {"score": float(np.mean(hits))}
