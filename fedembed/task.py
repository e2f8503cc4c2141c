"""Tasks: what an organisation trains.

A task builds the split model of one organisation (heads may differ per organisation,
in architecture and label space), serves its train/validation/test batches, defines the
loss and the metrics, and names one primary metric (higher is better) that is reported as
``score``. Built-in tasks: ``movies`` and ``synthetic``. A user's own task is a subclass
of :class:`Task`, loaded by import path ``package.module:ClassName``.

Every party builds the task from the same :class:`TaskSpec` (name + options), sent by the
coordinator; an organisation adds only what is its own (its index, its data location).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedembed.metrics import accuracy, micro_average_precision
from fedembed.model import SplitModel

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class TaskError(ValueError):
    """A task cannot be loaded or used as asked."""


@dataclass(frozen=True)
class TaskSpec:
    """Which task to run and its options; identical for every party of a run.

    Parameters
    ----------
    name : str
        ``movies``, ``synthetic`` or an import path ``package.module:ClassName``.
    options : dict
        Keyword options of the task (``orgs``, ``seed``, ``rows``...). JSON-serialisable.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON form (sent in every round's config)."""
        return json.dumps({"name": self.name, "options": self.options}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TaskSpec:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return TaskSpec(d["name"], d.get("options", {}))


class Task(ABC):
    """What every organisation of a run trains. Subclass it for your own task.

    Parameters
    ----------
    orgs : int
        Number of organisations in the run.
    seed : int
        Seed of the data split and of the head initialisation.
    **options
        Task-specific options.
    """

    #: Name of the primary metric returned by :meth:`evaluate` (higher is better).
    primary_metric: str = "score"

    def __init__(self, orgs: int, seed: int = 0, **options: Any) -> None:
        self.num_orgs = int(orgs)
        self.seed = int(seed)
        self.options = options

    @abstractmethod
    def org_names(self) -> list[str]:
        """Names of the organisations, index = organisation number."""

    @abstractmethod
    def table_shapes(self) -> dict[str, tuple[int, int]]:
        """``(rows, dim)`` of each shared table, the same for every organisation."""

    @abstractmethod
    def build_model(self, org: int) -> SplitModel:
        """A freshly initialised split model for organisation ``org``."""

    @abstractmethod
    def num_examples(self, org: int, split: str) -> int:
        """Number of examples of ``org`` in ``split``."""

    @abstractmethod
    def batches(self, org: int, split: str, batch_size: int, rng: np.random.Generator | None) -> Iterator[Any]:
        """Batches of ``org``'s ``split``; shuffled with ``rng`` when it is given."""

    @abstractmethod
    def loss(self, model: SplitModel, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: SplitModel, org: int, split: str) -> dict[str, float]:
        """Metrics of ``model`` on ``org``'s ``split``; must hold ``primary_metric``."""

    def heads_identical(self) -> bool:
        """True when every organisation's head has the same architecture and labels."""
        return False

    def id_bags(self, batch: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Bags of co-occurring ids in ``batch`` per shared table, as ``(ids, offsets)``.

        Feeds the shared self-supervised objective (:mod:`fedembed.cooc`). The default,
        no bags, turns it off for the task.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """A short JSON-able description for reports."""
        return {"orgs": self.org_names(), "tables": {k: list(v) for k, v in self.table_shapes().items()}}


# --------------------------------------------------------------------------- bag tasks


class BagModel(nn.Module):
    """Mean of a bag of shared embeddings, then a private MLP head."""

    def __init__(self, rows: int, dim: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.ids = nn.EmbeddingBag(rows, dim, mode="mean", sparse=True)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.ids(ids, offsets))


@dataclass
class BagBatch:
    """A batch of bag-of-ids examples."""

    ids: torch.Tensor
    offsets: torch.Tensor
    targets: torch.Tensor


class BagTask(Task):
    """Bag-of-ids classification over one shared table named ``ids``.

    Organisations come from :meth:`load` (a :class:`fedembed.data.FederatedData`); each
    has its own target (multi-label or multi-class) and therefore its own head.

    Parameters
    ----------
    orgs, seed
        See :class:`Task`.
    dim : int
        Embedding dimension of the shared table.
    hidden : int
        Width of the head's hidden layer.
    """

    def __init__(self, orgs: int, seed: int = 0, dim: int = 32, hidden: int = 64, **options: Any) -> None:
        super().__init__(orgs, seed, **options)
        self.dim = int(dim)
        self.hidden = int(hidden)
        self.data = self.load()
        if len(self.data.orgs) != self.num_orgs:
            raise TaskError(f"asked for {self.num_orgs} organisations, data has {len(self.data.orgs)}")

    @abstractmethod
    def load(self):  # -> FederatedData
        """Load the federated data set."""

    def org_names(self) -> list[str]:
        return [o.name for o in self.data.orgs]

    def table_shapes(self) -> dict[str, tuple[int, int]]:
        return {"ids": (int(self.data.vocab_size), self.dim)}

    def heads_identical(self) -> bool:
        first = self.data.orgs[0]
        return all(o.kind == first.kind and o.label_names == first.label_names for o in self.data.orgs)

    def build_model(self, org: int) -> SplitModel:
        o = self.data.orgs[org]
        torch.manual_seed(self.seed * 1000 + org)
        return SplitModel(BagModel(self.data.vocab_size, self.dim, o.num_classes, self.hidden), tables={"ids": "ids"})

    def _split(self, org: int, split: str):
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self.data.orgs[org], split)

    def num_examples(self, org: int, split: str) -> int:
        return len(self._split(org, split))

    def batches(self, org: int, split: str, batch_size: int, rng: np.random.Generator | None) -> Iterator[BagBatch]:
        bags = self._split(org, split)
        n = len(bags)
        order = rng.permutation(n) if rng is not None else np.arange(n)
        kind = self.data.orgs[org].kind
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            lo, hi = bags.offsets[idx], bags.offsets[idx + 1]
            lengths = hi - lo
            ids = np.concatenate([bags.ids[a:b] for a, b in zip(lo, hi)]) if len(idx) else np.zeros(0, np.int64)
            offsets = np.r_[0, np.cumsum(lengths)[:-1]]
            t = bags.targets[idx]
            targets = torch.from_numpy(t.astype(np.float32) if kind == "multilabel" else t.astype(np.int64))
            yield BagBatch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(offsets.astype(np.int64)), targets)

    def id_bags(self, batch: BagBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"ids": (batch.ids, batch.offsets)}

    def loss(self, model: SplitModel, batch: BagBatch) -> torch.Tensor:
        logits = model(batch.ids, batch.offsets)
        if batch.targets.dtype == torch.float32:
            return F.binary_cross_entropy_with_logits(logits, batch.targets)
        return F.cross_entropy(logits, batch.targets)

    @torch.no_grad()
    def evaluate(self, model: SplitModel, org: int, split: str) -> dict[str, float]:
        model.eval()
        outs, tgts, losses, n = [], [], 0.0, 0
        for b in self.batches(org, split, 1024, None):
            logits = model(b.ids, b.offsets)
            losses += float(self.loss(model, b)) * len(b.targets)
            n += len(b.targets)
            outs.append(logits.numpy())
            tgts.append(b.targets.numpy())
        model.train()
        if n == 0:
            return {"score": 0.0, "loss": 0.0}
        logits, targets = np.concatenate(outs), np.concatenate(tgts)
        if self.data.orgs[org].kind == "multilabel":
            return {"score": micro_average_precision(targets, logits), "loss": losses / n}
        return {"score": accuracy(targets, logits), "loss": losses / n}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["targets"] = {o.name: o.target for o in self.data.orgs}
        d["train_examples"] = {o.name: len(o.train) for o in self.data.orgs}
        return d


class MoviesTask(BagTask):
    """The real ``movies.db`` of bokeh-sampledata: people of a film -> its genres (or decade, meter).

    Options: ``scenario`` = ``same`` (every organisation predicts genres) or ``mixed``
    (organisations predict different targets), ``dim``, ``hidden``.
    """

    def __init__(self, orgs: int = 5, seed: int = 0, scenario: str = "same", **options: Any) -> None:
        self.scenario = scenario
        super().__init__(orgs, seed, **options)

    def load(self):
        from fedembed.data.movies import load_movies

        return load_movies(num_orgs=self.num_orgs, scenario=self.scenario, seed=self.seed)


class SyntheticTask(BagTask):
    """Zipf-popular ids, each organisation with its own hidden labelling and hot rows.

    Options: ``rows`` (table rows), ``dim``, ``touch`` (fraction of rows one organisation
    touches per round), ``examples`` (per organisation), ``hidden``.
    """

    def __init__(
        self, orgs: int = 5, seed: int = 0, rows: int = 100_000, touch: float = 0.01, examples: int = 2000, **options: Any
    ) -> None:
        self.rows, self.touch, self.examples = int(rows), float(touch), int(examples)
        super().__init__(orgs, seed, **options)

    def load(self):
        from fedembed.data.synthetic import make_synthetic

        return make_synthetic(
            num_orgs=self.num_orgs, rows=self.rows, touch=self.touch, seed=self.seed, examples_per_org=self.examples
        )


BUILTIN_TASKS: dict[str, type[Task]] = {"movies": MoviesTask, "synthetic": SyntheticTask}


def resolve_task_class(name: str) -> type[Task]:
    """The task class for a built-in name or an import path ``package.module:ClassName``.

    Raises
    ------
    TaskError
        Unknown name, module not importable, attribute missing or not a Task subclass.
    """
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    if ":" not in name:
        raise TaskError(f"unknown task {name!r}: use one of {sorted(BUILTIN_TASKS)} or 'package.module:ClassName'")
    mod_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise TaskError(f"cannot import task module {mod_name!r}: {exc}") from exc
    cls = getattr(mod, attr, None)
    if cls is None:
        raise TaskError(f"module {mod_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"{name!r} is not a subclass of fedembed.task.Task")
    return cls


@functools.lru_cache(maxsize=4)
def _load_cached(spec_json: str) -> Task:
    spec = TaskSpec.from_json(spec_json)
    cls = resolve_task_class(spec.name)
    try:
        return cls(**spec.options)
    except TypeError as exc:
        raise TaskError(f"task {spec.name!r} rejected its options {spec.options}: {exc}") from exc


def load_task(spec: TaskSpec) -> Task:
    """Build (once per process) the task described by ``spec``."""
    return _load_cached(spec.to_json())
