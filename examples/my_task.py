"""Your own model and data: fedembed simulate --task examples.my_task:ClicksTask --orgs 3"""
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

    def __init__(self, orgs: int, seed: int = 0, products: int = 5000):
        super().__init__(orgs, seed)
        self.products, rng = products, np.random.default_rng(seed)  # stand-in for each org's files
        self.data = [(rng.integers(0, products, (600, 5)), rng.random(600) < 0.3) for _ in range(orgs)]

    def org_names(self): return [f"shop-{i}" for i in range(self.num_orgs)]
    def table_shapes(self): return {"products": (self.products, 16)}
    def build_model(self, org): return SplitModel(Net(self.products), tables=["products"])
    def num_examples(self, org, split): return self.SPLITS[split][1] - self.SPLITS[split][0]

    def batches(self, org, split, batch_size, rng):
        (x, y), (lo, hi) = self.data[org], self.SPLITS[split]
        idx = lo + (rng.permutation(hi - lo) if rng is not None else np.arange(hi - lo))
        for s in range(0, len(idx), batch_size):
            yield torch.from_numpy(x[idx[s:s + batch_size]]), torch.from_numpy(y[idx[s:s + batch_size]] * 1.0).float()

    def loss(self, model, batch): return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model, org, split):
        return {"score": float(np.mean([((model(x) > 0).float() == y).float().mean() for x, y in self.batches(org, split, 10**6, None)]))}
