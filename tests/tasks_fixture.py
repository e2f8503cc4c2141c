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
