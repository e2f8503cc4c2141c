"""Tasks used by the tests as a user would write them (loaded by file path)."""

import numpy as np
import torch
from torch import nn

from fedembed import SplitModel, Task


class NoOrgTask(Task):
    """A task that takes no org/orgs options: one organisation's own data only."""

    def __init__(self, data=None, seed=0, rows=20):
        super().__init__(data, seed)
        self.rows = rows

    def build_model(self):
        return SplitModel(nn.Sequential(nn.Embedding(self.rows, 4), nn.Flatten(), nn.Linear(8, 1)), tables={"t": "0"})

    def num_examples(self, split):
        return 8

    def batches(self, split, batch_size, rng):
        yield torch.zeros(8, 2, dtype=torch.long), torch.zeros(8)

    def loss(self, model, batch):
        return nn.functional.mse_loss(model(batch[0]).squeeze(1), batch[1])

    def evaluate(self, model, split):
        return {"score": float(np.float32(0.0))}


class UsersItemsTask(Task):
    """Two shared tables of different sizes (a small ``users``, a larger ``items``): click = f(user, item)."""

    def __init__(self, data=None, seed=0, users=200, items=3000, org=0, orgs=1):
        super().__init__(data, seed)
        self.users, self.items = int(users), int(items)
        rng = np.random.default_rng([int(seed), int(org)])
        self.x = np.stack([rng.integers(0, self.users, 300), rng.integers(0, self.items // 10, 300)], 1)
        self.y = (rng.random(300) < 0.5).astype(np.float32)

    def build_model(self):
        class Net(nn.Module):
            def __init__(self, users, items):
                super().__init__()
                self.users, self.items = nn.Embedding(users, 4), nn.Embedding(items, 4)
                self.head = nn.Linear(8, 1)

            def forward(self, x):
                return self.head(torch.cat([self.users(x[:, 0]), self.items(x[:, 1])], 1)).squeeze(1)

        return SplitModel(Net(self.users, self.items), tables=["users", "items"])

    SPLITS = {"train": (0, 200), "val": (200, 250), "test": (250, 300)}

    def num_examples(self, split):
        return self.SPLITS[split][1] - self.SPLITS[split][0]

    def batches(self, split, batch_size, rng):
        lo, hi = self.SPLITS[split]
        idx = lo + (rng.permutation(hi - lo) if rng is not None else np.arange(hi - lo))
        for s in range(0, len(idx), batch_size):
            take = idx[s:s + batch_size]
            yield torch.from_numpy(self.x[take]), torch.from_numpy(self.y[take])

    def loss(self, model, batch):
        return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model, split):
        x, y = next(self.batches(split, 10**6, None))
        return {"score": float(((model(x) > 0).float() == y).float().mean())}
