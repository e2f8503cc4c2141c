"""A user's own task: their model, their data, their loss. Run it with
``fedembed simulate --task examples.my_task:ClicksTask --orgs 3``."""
import numpy as np
import torch
from torch import nn

from fedembed import SplitModel, Task


class Net(nn.Module):
    def __init__(self, products: int, dim: int = 16):
        super().__init__()
        self.products = nn.Embedding(products, dim)          # shared with everyone
        self.head = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 1))  # private

    def forward(self, ids):                                  # ids: (batch, items)
        return self.head(self.products(ids).mean(1)).squeeze(1)


class ClicksTask(Task):
    def __init__(self, orgs: int, seed: int = 0, products: int = 5000):
        super().__init__(orgs, seed)
        self.products = products
        rng = np.random.default_rng(seed)                    # stand-in for each org's own files
        self.data = [(rng.integers(0, products, (600, 5)), rng.random(600) < 0.3) for _ in range(orgs)]

    def org_names(self): return [f"shop-{i}" for i in range(self.num_orgs)]
    def table_shapes(self): return {"products": (self.products, 16)}
    def build_model(self, org): return SplitModel(Net(self.products), tables=["products"])
    def num_examples(self, org, split): return {"train": 400, "val": 100, "test": 100}[split]

    def batches(self, org, split, batch_size, rng):
        x, y = self.data[org]
        lo = {"train": 0, "val": 400, "test": 500}[split]
        idx = lo + (rng.permutation(self.num_examples(org, split)) if rng is not None else np.arange(self.num_examples(org, split)))
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            yield torch.from_numpy(x[b]), torch.from_numpy(y[b].astype(np.float32))

    def loss(self, model, batch):
        return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model, org, split):
        ok = [((model(x) > 0).float() == y).float().mean().item() for x, y in self.batches(org, split, 1000, None)]
        return {"score": float(np.mean(ok))}
