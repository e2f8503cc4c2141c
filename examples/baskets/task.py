"""Your own task, on your own data files, with string ids: basket -> bought the promoted product?

Each organisation has ONE CSV file of its own baskets, header ``basket,skus,label``::

    basket,skus,label
    b-0-00001,SKU-00417;SKU-93012;SKU-00007,1

``skus`` are string ids. The shared table ``skus`` is keyed by the federation's published
vocabulary file (one SKU per line, the same file for everyone, ``vocabulary=PATH``); a SKU
that is not in it goes to its out-of-vocabulary row. Everything else (the head, the data,
the splits) is the organisation's own.

    fedembed client --task examples/baskets/task.py:BasketsTask --data org-0.csv \\
        --option vocabulary=skus.txt ...

``score`` is the ROC AUC on the split (``loss``: mean binary cross-entropy).
"""
import csv
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedembed import SplitModel, Task
from fedembed.vocab import Vocabulary

log = logging.getLogger(__name__)


class BasketNet(nn.Module):  # plain torch: a shared SKU table and a private head
    def __init__(self, skus: int, dim: int, hidden: int):
        super().__init__()
        self.skus = nn.EmbeddingBag(skus, dim, mode="mean")
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, ids, offsets):  # ids: every basket's SKU rows, one after the other
        return self.head(self.skus(ids, offsets)).squeeze(1)


class BasketsTask(Task):
    def __init__(self, data=None, seed=0, vocabulary=None, dim=16, hidden=32):
        super().__init__(data, seed)
        if data is None or vocabulary is None:
            raise ValueError("BasketsTask needs --data BASKETS.csv and --option vocabulary=SKUS.txt")
        self.name, self.dim, self.hidden = Path(data).stem, int(dim), int(hidden)
        self.vocab = Vocabulary.load(vocabulary)
        with open(data, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        bags = [[s for s in r["skus"].split(";") if s] for r in rows]
        if len(rows) < 10:
            raise ValueError(f"{data}: {len(rows)} baskets, too few to split into train/val/test")
        self.labels = np.array([float(r["label"]) for r in rows], dtype=np.float32)
        self.ids, oov = self.vocab.lookup_with_oov([s for bag in bags for s in bag])
        self.offsets = np.cumsum([0] + [len(bag) for bag in bags])  # basket i is ids[offsets[i]:offsets[i + 1]]
        log.info("%s: %d baskets, %d of %d SKU lookups out of the vocabulary (its OOV row)",
                 self.name, len(rows), oov, len(self.ids))
        order = np.random.default_rng(self.seed).permutation(len(rows))
        a, b = int(0.7 * len(rows)), int(0.8 * len(rows))
        self.splits = {"train": order[:a], "val": order[a:b], "test": order[b:]}

    def vocabularies(self): return {"skus": self.vocab}
    def num_examples(self, split): return len(self.splits[split])

    def build_model(self):
        torch.manual_seed(self.seed)
        return SplitModel(BasketNet(self.vocab.rows, self.dim, self.hidden), tables=["skus"])

    def batches(self, split, batch_size, rng):
        idx = self.splits[split]
        if rng is not None:
            idx = idx[rng.permutation(len(idx))]
        for s in range(0, len(idx), batch_size):
            i = idx[s:s + batch_size]
            lo, hi = self.offsets[i], self.offsets[i + 1]
            ids = np.concatenate([self.ids[x:y] for x, y in zip(lo, hi)])
            yield torch.from_numpy(ids), torch.from_numpy(np.r_[0, np.cumsum(hi - lo)[:-1]]), torch.from_numpy(self.labels[i])

    def id_bags(self, batch): return {"skus": (batch[0], batch[1])}  # for the optional co-occurrence objective

    def loss(self, model, batch):
        ids, offsets, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(ids, offsets), y)

    @torch.no_grad()
    def evaluate(self, model, split):
        ids, offsets, y = (t.to(self.device) for t in next(self.batches(split, len(self.splits[split]), None)))
        logits = model(ids, offsets)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        return {"score": roc_auc(y.cpu().numpy(), logits.cpu().numpy()), "loss": float(loss)}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Chance that a random positive scores above a random negative (ties count half); 0.5 without both."""
    pos, neg = scores[labels > 0.5], np.sort(scores[labels <= 0.5])
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    below, not_above = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float((below + not_above).sum() / (2.0 * len(pos) * len(neg)))
