"""Tasks: what one organisation trains, on its own data, with its own code.

A task is the organisation's side of the federation, and only its side: it builds the
organisation's split model (shared tables + private head), serves its train/val/test
batches, defines the loss and the metrics. The organisation names it in its own
configuration (``fedembed client --task pkg.mod:Class --data PATH --option k=v``, a TOML
file, or the same keys in a stock SuperNode's ``--node-config``) and loads it itself:
it never imports code the coordinator names. The coordinator knows only the federation
spec (:mod:`fedembed.spec`), which every organisation checks its model against
(:meth:`Task.table_specs`).

What a task must implement: :meth:`Task.build_model`, :meth:`Task.num_examples`,
:meth:`Task.batches`, :meth:`Task.loss`, :meth:`Task.evaluate` (a dict with ``score``,
higher is better; ``loss`` and any other numbers are reported as given). What it may:
:meth:`Task.vocabularies` (string ids, :mod:`fedembed.vocab`), :meth:`Task.id_bags`
(the co-occurrence objective), :attr:`Task.name`. Its constructor takes ``data`` (the
``--data`` path, or None), ``seed`` and its own keyword options; a simulation of N
organisations also passes ``org`` and ``orgs`` to a task whose constructor accepts them
(that is how one data set is split into simulated organisations).

Built-in tasks: ``movies`` and ``synthetic`` (options ``org``, ``orgs`` and their own).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedembed.errors import FedembedError
from fedembed.metrics import accuracy, micro_average_precision
from fedembed.model import SplitModel
from fedembed.spec import FederationSpec, TableSpec
from fedembed.vocab import Vocabulary

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class TaskError(FedembedError, ValueError):
    """A task cannot be loaded or used as asked."""


def task_loss(task: Task, model: nn.Module, batch: Any) -> torch.Tensor:
    """``task.loss(model, batch)``, held to the task contract: a scalar floating tensor.

    Every training loop calls the task's loss through this, so a task that breaks the
    contract fails with its fault named rather than deep inside a step.

    Raises
    ------
    TaskError
        The loss raised (its error is named), or returned something other than a 0-dim
        floating-point tensor (for instance an unreduced per-example loss).
    """
    try:
        loss = task.loss(model, batch)
    except FedembedError:
        raise
    except Exception as exc:  # noqa: BLE001 - the task's own code or model: named, not swallowed
        raise TaskError(f"the task's loss(model, batch) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        what = (f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor)
                else f"a {type(loss).__name__}")
        raise TaskError(f"the task's loss(model, batch) returned {what}: it must return one scalar floating-point "
                        "tensor (reduce a per-example loss, e.g. with .mean())")
    return loss


def task_metrics(task: Task, model: nn.Module, split: str) -> dict[str, float]:
    """``task.evaluate(model, split)``, held to the task contract: numbers, with a ``score``.

    Raises
    ------
    TaskError
        The evaluation raised, returned no mapping, no ``score``, or a value that is not a
        real number (NaN and infinities are numbers here; the caller decides about them).
    """
    try:
        metrics = task.evaluate(model, split)
    except FedembedError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TaskError(f"the task's evaluate(model, {split!r}) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(metrics, Mapping):
        raise TaskError(f"the task's evaluate(model, {split!r}) returned a {type(metrics).__name__}: "
                        "it must return a dict of numbers with a 'score' (higher is better)")
    if "score" not in metrics:
        raise TaskError(f"the task's evaluate(model, {split!r}) returned {sorted(map(str, metrics))} without a "
                        "'score': early stopping, the guard and the reports choose by it (higher is better)")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            if isinstance(value, bool | str | bytes):
                raise TypeError
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise TaskError(f"the task's evaluate(model, {split!r}) gave {str(key)!r} = {value!r}: "
                            "metrics must be real numbers") from None
    return out


def check_task(task: Task) -> None:
    """Try the task's contract once on a fresh model, before any round: a fault now, not in round 1.

    Builds the model, takes the loss of one training batch (no step) and evaluates the
    validation split, through :func:`task_loss` and :func:`task_metrics`; the model stays on
    the CPU unless the task put it elsewhere. A simulation checks every organisation's task
    before its engine starts; ``fedembed client`` checks its own before it joins.

    Raises
    ------
    TaskError
        ``build_model`` did not return a :class:`SplitModel`, a split's size is not a
        count, ``batches("train", ...)`` yields nothing for a non-empty split, or the loss
        or the evaluation breaks the contract.
    """
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the check draws nothing a seeded run would see
        try:
            _check_contract(task)
        finally:
            np.random.set_state(state)


def check_tasks(specs: list[TaskSpec], names: list[str]) -> None:
    """:func:`check_task` for each simulated organisation; its fault is prefixed with its name."""
    for spec, name in zip(specs, names):
        try:
            check_task(load_task(spec))
        except TaskError as exc:
            raise TaskError(f"organisation {name!r}: {exc}") from exc


def _check_contract(task: Task) -> None:
    model = task.build_model()
    if not isinstance(model, SplitModel):
        raise TaskError(f"the task's build_model() returned a {type(model).__name__}: it must return a SplitModel "
                        "(the torch model wrapped with the names of its shared tables)")
    sizes = {}
    for split in SPLITS:
        n = task.num_examples(split)
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise TaskError(f"the task's num_examples({split!r}) returned {n!r}: it must be a count (an int >= 0)")
        sizes[split] = int(n)
    model.to(task.device)
    if sizes["train"]:
        batch = next(iter(task.batches("train", 8, np.random.default_rng(0))), None)
        if batch is None:
            raise TaskError(f"the task's batches('train', ...) yielded nothing, but num_examples('train') is "
                            f"{sizes['train']}")
        task_loss(task, model, to_device(batch, task.device))
    if sizes["val"]:
        model.eval()
        task_metrics(task, model, "val")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside tuples, lists, dicts, dataclasses) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "__dataclass_fields__"):
        return type(batch)(**{k: to_device(getattr(batch, k), device) for k in batch.__dataclass_fields__})
    return batch


class Task(ABC):
    """One organisation's task. Subclass it for your own.

    Parameters
    ----------
    data : str or None
        Where the organisation's data is (``--data``); the task decides what it means.
    seed : int
        Seed of the task's own randomness (splits, head initialisation).
    **options
        Task-specific options (``--option k=v``).

    Attributes
    ----------
    device : torch.device
        Where the organisation trains (``--device``); set before training and evaluation.
        Batches are moved there for training; :meth:`evaluate` receives the model on it.
    """

    #: Display name of this organisation in a simulation (a deployment names it by its roster key).
    name: str | None = None

    def __init__(self, data: str | None = None, seed: int = 0, **options: Any) -> None:
        self.data = data
        self.seed = int(seed)
        self.options = options
        self.device = torch.device("cpu")

    @abstractmethod
    def build_model(self) -> SplitModel:
        """A freshly initialised split model of this organisation."""

    @abstractmethod
    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` (``train``, ``val`` or ``test``)."""

    @abstractmethod
    def batches(self, split: str, batch_size: int, rng: np.random.Generator | None) -> Iterator[Any]:
        """Batches of ``split``; shuffled with ``rng`` when it is given."""

    def privacy_units(self, split: str) -> np.ndarray | None:
        """Which records belong together: one user id per example of ``split``, or None (the default).

        Record-level DP with ``dp_unit user`` (:mod:`fedembed.dp.local`) samples users and
        clips each user's records as one, so its guarantee covers a user with all their
        records. Return the same id for every record of one person (or account, patient,
        ...); ids need not be contiguous.
        """
        return None

    @abstractmethod
    def loss(self, model: SplitModel, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: SplitModel, split: str) -> dict[str, float]:
        """Metrics of ``model`` on ``split``: ``score`` (higher is better) and any others."""

    def vocabularies(self) -> dict[str, Vocabulary]:
        """The vocabulary that keys each shared table's rows (default: none, rows by index)."""
        return {}

    def id_bags(self, batch: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Bags of co-occurring ids in ``batch`` per shared table, as ``(ids, offsets)``.

        Feeds the shared self-supervised objective (:mod:`fedembed.cooc`). The default,
        no bags, turns it off for the task.
        """
        return {}

    def working_set(self) -> dict[str, np.ndarray] | None:
        """Every row of each shared table this organisation's data can look up (any split).

        An organisation syncing its working set (:mod:`fedembed.workingset`) asks the
        coordinator to keep these rows fresh (and, by default, hides those its uploads
        never show among decoys). Return a new answer when the data changes (it is
        asked every round). The default, None, lets fedembed find the rows itself with one
        pass over every split with the lookups recorded; a task that reads rows other than
        through its tables' forward (or :meth:`id_bags`) must list them here.
        """
        return None

    def table_specs(self) -> dict[str, TableSpec]:
        """This organisation's shared tables as the federation spec describes them (shape, vocabulary digest).

        Raises
        ------
        TaskError
            A vocabulary whose rows differ from the model's table.
        """
        shapes = self.build_model().table_shapes()
        vocabs = self.vocabularies()
        unknown = sorted(set(vocabs) - set(shapes))
        if unknown:
            raise TaskError(f"vocabularies for tables the model does not share: {unknown}")
        out = {}
        for name, (rows, dim) in shapes.items():
            v = vocabs.get(name)
            if v is not None and v.rows != rows:
                raise TaskError(f"table {name!r} has {rows} rows, its vocabulary needs {v.rows}")
            out[name] = TableSpec(rows=int(rows), dim=int(dim), vocabulary=v.digest if v is not None else None)
        return out

    def federation_spec(self) -> FederationSpec:
        """The federation spec this organisation's model fits (what ``fedembed spec`` publishes)."""
        return FederationSpec(self.table_specs())


@dataclass(frozen=True)
class TaskSpec:
    """An organisation's own choice of task: what it loads, from where, with which options.

    Parameters
    ----------
    name : str
        ``movies``, ``synthetic``, ``package.module:Class`` or ``path/to/file.py:Class``.
    options : dict
        Keyword options of the task. JSON-serialisable.
    data : str or None
        The organisation's data location (``--data``).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    data: str | None = None

    def to_json(self) -> str:
        """Canonical JSON form."""
        return json.dumps({"name": self.name, "options": self.options, "data": self.data}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TaskSpec:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return TaskSpec(d["name"], d.get("options", {}), d.get("data"))

    def for_org(self, org: int, orgs: int) -> TaskSpec:
        """This spec for simulated organisation ``org`` of ``orgs``: ``org``/``orgs`` given to a task that takes them."""
        params = _init_params(resolve_task_class(self.name))
        extra = {k: v for k, v in (("org", org), ("orgs", orgs)) if k in params or "**" in params}
        return TaskSpec(self.name, {**self.options, **extra}, self.data)


def _init_params(cls: type) -> set[str]:
    params = set()
    for p in inspect.signature(cls.__init__).parameters.values():
        params.add("**" if p.kind is p.VAR_KEYWORD else p.name)
    return params


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
    """Bag-of-ids classification over one shared table named ``ids``: one organisation of a built-in data set.

    The data set (a :class:`fedembed.data.FederatedData`) comes from :meth:`load`; this
    organisation is its partition ``org``, with its own target and so its own head.

    Parameters
    ----------
    data, seed
        See :class:`Task`.
    org, orgs : int
        This organisation's partition and the number of partitions.
    dim : int
        Embedding dimension of the shared table.
    hidden : int
        Width of the head's hidden layer.
    """

    def __init__(self, data: str | None = None, seed: int = 0, org: int = 0, orgs: int = 5,
                 dim: int = 32, hidden: int = 64) -> None:
        super().__init__(data, seed)
        self.org, self.orgs = int(org), int(orgs)
        if not 0 <= self.org < self.orgs:
            raise TaskError(f"org must be in [0, orgs={self.orgs}), got {self.org}")
        self.dim, self.hidden = int(dim), int(hidden)
        fed = self.load()
        if len(fed.orgs) != self.orgs:
            raise TaskError(f"asked for {self.orgs} organisations, data has {len(fed.orgs)}")
        self.part = replace(fed.orgs[self.org])  # a copy: the cached data set is never changed
        self.rows = int(fed.vocab_size)
        self.name = self.part.name

    @abstractmethod
    def load(self):  # -> FederatedData
        """Load the federated data set (cached per process)."""

    def build_model(self) -> SplitModel:
        torch.manual_seed(self.seed * 1000 + self.org)
        return SplitModel(BagModel(self.rows, self.dim, self.part.num_classes, self.hidden), tables={"ids": "ids"})

    def _split(self, split: str):
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self.part, split)

    def num_examples(self, split: str) -> int:
        return len(self._split(split))

    def batches(self, split: str, batch_size: int, rng: np.random.Generator | None) -> Iterator[BagBatch]:
        n = len(self._split(split))
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_size):
            yield self.batch_of(split, order[start : start + batch_size])

    def batch_of(self, split: str, idx: np.ndarray) -> BagBatch:
        """The batch of examples ``idx`` of ``split`` (DP training draws its own Poisson samples, :mod:`fedembed.dp.local`)."""
        bags = self._split(split)
        idx = np.asarray(idx, dtype=np.int64)
        lo, hi = bags.offsets[idx], bags.offsets[idx + 1]
        lengths = hi - lo
        ids = np.concatenate([bags.ids[a:b] for a, b in zip(lo, hi)]) if len(idx) else np.zeros(0, np.int64)
        offsets = np.r_[0, np.cumsum(lengths)[:-1]] if len(idx) else np.zeros(0, np.int64)
        t = bags.targets[idx]
        targets = torch.from_numpy(t.astype(np.float32) if self.part.kind == "multilabel" else t.astype(np.int64))
        return BagBatch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(offsets.astype(np.int64)), targets)

    def id_bags(self, batch: BagBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"ids": (batch.ids, batch.offsets)}

    def working_set(self) -> dict[str, np.ndarray]:
        """The ids of every bag of every split (computed once: the partition does not change)."""
        if getattr(self, "_working_set", None) is None:
            self._working_set = {"ids": np.unique(np.concatenate([self._split(s).ids for s in SPLITS])).astype(np.int64)}
        return self._working_set

    def loss(self, model: SplitModel, batch: BagBatch) -> torch.Tensor:
        logits = model(batch.ids, batch.offsets)
        if batch.targets.dtype == torch.float32:
            return F.binary_cross_entropy_with_logits(logits, batch.targets)
        return F.cross_entropy(logits, batch.targets)

    def example_losses(self, model: SplitModel, batch: BagBatch) -> torch.Tensor:
        """One loss per example, shape ``(B,)``: their mean is :meth:`loss` (DP training clips each one's gradient)."""
        logits = model(batch.ids, batch.offsets)
        if batch.targets.dtype == torch.float32:
            return F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none").mean(1)
        return F.cross_entropy(logits, batch.targets, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: SplitModel, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        outs, tgts, losses, n = [], [], 0.0, 0
        for b in self.batches(split, 1024, None):
            b = to_device(b, self.device)
            logits = model(b.ids, b.offsets)
            losses += float(self.loss(model, b)) * len(b.targets)
            n += len(b.targets)
            outs.append(logits.cpu().numpy())
            tgts.append(b.targets.cpu().numpy())
        model.train(was_training)
        if n == 0:
            return {"score": 0.0, "loss": 0.0}
        logits, targets = np.concatenate(outs), np.concatenate(tgts)
        if self.part.kind == "multilabel":
            return {"score": micro_average_precision(targets, logits), "loss": losses / n}
        return {"score": accuracy(targets, logits), "loss": losses / n}


@functools.lru_cache(maxsize=2)
def _movies(orgs: int, scenario: str, seed: int, db_path: str | None):
    from fedembed.data.movies import load_movies

    return load_movies(num_orgs=orgs, scenario=scenario, seed=seed, db_path=db_path)


class MoviesTask(BagTask):
    """One organisation of the real ``movies.db`` of bokeh-sampledata: people of a film -> its genres (or decade, meter).

    People are shared-table ids by name: every organisation maps the names in its films
    through the published people vocabulary (``vocabulary``, a file of one name per line;
    default: every person of the database, sorted), with one out-of-vocabulary row.

    Options: ``org``, ``orgs``, ``scenario`` = ``same`` (every organisation predicts
    genres) or ``mixed`` (organisations predict different targets), ``dim``, ``hidden``,
    ``vocabulary``. ``data`` is a ``movies.db`` (default: the one bokeh-sampledata ships).
    """

    def __init__(self, data: str | None = None, seed: int = 0, org: int = 0, orgs: int = 5, scenario: str = "same",
                 dim: int = 32, hidden: int = 64, vocabulary: str | None = None) -> None:
        self.scenario = scenario
        self.vocabulary_path = vocabulary
        super().__init__(data, seed, org, orgs, dim, hidden)
        fed = self.load()
        self.vocab = Vocabulary.load(vocabulary) if vocabulary else people_vocabulary(data)
        names = np.asarray(fed.id_names, dtype=object)
        oov = 0
        for split in SPLITS:  # the organisation's films name people; the vocabulary gives their rows
            bags = getattr(self.part, split)
            rows, missed = self.vocab.lookup_with_oov(names[bags.ids].tolist())
            oov += missed
            setattr(self.part, split, type(bags)(bags.offsets, rows, bags.targets))
        if oov:
            log.info("%s: %d people out of the vocabulary (mapped to its OOV row)", self.name, oov)
        self.rows = self.vocab.rows

    def load(self):
        return _movies(self.orgs, self.scenario, self.seed, self.data)

    def vocabularies(self) -> dict[str, Vocabulary]:
        return {"ids": self.vocab}


def people_vocabulary(db_path: str | None = None) -> Vocabulary:
    """The movies people vocabulary: every person of ``movies.db``, by normalised name, sorted."""
    return Vocabulary.from_ids(_movies(1, "same", 0, db_path).id_names)


class SyntheticTask(BagTask):
    """One organisation of the synthetic data: Zipf-popular ids, its own hidden labelling and hot rows.

    Options: ``org``, ``orgs``, ``rows`` (table rows), ``dim``, ``touch`` (fraction of rows
    one organisation touches per round), ``examples`` (per organisation), ``hidden``,
    ``users`` (0: none; else the examples of each split belong to that many users, example
    ``i`` to user ``i mod users``: :meth:`privacy_units`, for user-level DP).
    """

    def __init__(self, data: str | None = None, seed: int = 0, org: int = 0, orgs: int = 5, rows: int = 100_000,
                 touch: float = 0.01, examples: int = 2000, dim: int = 32, hidden: int = 64, users: int = 0) -> None:
        self.n_rows, self.touch, self.examples, self.users = int(rows), float(touch), int(examples), int(users)
        if not 0 < self.touch <= 1:
            raise TaskError(f"touch must be in (0, 1], got {touch}")
        if self.users < 0:
            raise TaskError(f"users must be >= 0, got {users}")
        super().__init__(data, seed, org, orgs, dim, hidden)

    def privacy_units(self, split: str) -> np.ndarray | None:
        """Example ``i`` of ``split`` belongs to user ``i mod users`` (None without ``users``)."""
        return np.arange(self.num_examples(split), dtype=np.int64) % self.users if self.users else None

    def load(self):
        return _synthetic(self.orgs, self.n_rows, self.touch, self.seed, self.examples)


@functools.lru_cache(maxsize=2)
def _synthetic(orgs: int, rows: int, touch: float, seed: int, examples: int):
    from fedembed.data.synthetic import make_synthetic

    return make_synthetic(num_orgs=orgs, rows=rows, touch=touch, seed=seed, examples_per_org=examples)


BUILTIN_TASKS: dict[str, type[Task]] = {"movies": MoviesTask, "synthetic": SyntheticTask}


def resolve_task_class(name: str) -> type[Task]:
    """The task class for a built-in name, ``package.module:Class`` or ``path/to/file.py:Class``.

    Raises
    ------
    TaskError
        Unknown name, module or file not importable, attribute missing or not a Task subclass.
    """
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    if ":" not in name:
        raise TaskError(
            f"unknown task {name!r}: use one of {sorted(BUILTIN_TASKS)}, 'package.module:Class' or 'path/file.py:Class'"
        )
    mod_name, _, attr = name.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise TaskError(f"task file {path} not found")
        key = f"fedembed_user_task_{abs(hash(str(path)))}"
        mod = sys.modules.get(key)
        if mod is None:
            # as when Python runs the file as a script: modules beside it are importable, from any directory
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(key, path)
            if spec is None or spec.loader is None:
                raise TaskError(f"cannot load task file {path}")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[key] = mod
            try:
                spec.loader.exec_module(mod)
            except Exception as exc:
                del sys.modules[key]
                raise TaskError(f"task file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise TaskError(f"cannot import task module {mod_name!r}: {exc}") from exc
    cls = getattr(mod, attr, None)
    if cls is None:
        raise TaskError(f"{mod_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"{name!r} is not a subclass of fedembed.task.Task")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise TaskError(f"task {name!r} does not implement {missing}: a task must implement build_model, "
                        "num_examples, batches, loss and evaluate")
    return cls


@functools.lru_cache(maxsize=8)
def _load_cached(spec_json: str) -> Task:
    spec = TaskSpec.from_json(spec_json)
    cls = resolve_task_class(spec.name)
    params = _init_params(cls)
    if "**" not in params:
        unknown = sorted(set(spec.options) - params)
        if unknown:
            accepted = sorted(params - {"self", "data", "seed"})
            raise TaskError(f"task {spec.name!r} takes no option {', '.join(map(repr, unknown))}; its options: {accepted}")
    try:
        return cls(data=spec.data, **spec.options)
    except TaskError:
        raise
    except TypeError as exc:
        raise TaskError(f"task {spec.name!r} rejected its options {spec.options}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the task's own constructor: its fault, named, with the options it got
        raise TaskError(f"task {spec.name!r} failed to build with options {spec.options}: "
                        f"{type(exc).__name__}: {exc}") from exc


def load_task(spec: TaskSpec) -> Task:
    """Build (once per process) the organisation task ``spec`` describes.

    Raises
    ------
    TaskError
        Unknown task, options it does not take, or a constructor that failed.
    """
    return _load_cached(spec.to_json())


# --------------------------------------------------------------------------- the organisation's configuration

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:<n>`` or ``auto`` (CUDA when this machine has it, else CPU).

    Raises
    ------
    TaskError
        An unknown device, or CUDA asked for where torch sees none.
    """
    name = str(name or "cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise TaskError(f"unknown device {name!r}: use cpu, cuda, cuda:<n> or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TaskError(f"device {name!r} asked for, but torch sees no CUDA device here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise TaskError(f"unknown device {name!r}: {exc}") from exc


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as options: a value is JSON when it parses (numbers, true, lists), else a string.

    Raises
    ------
    TaskError
        An item without ``=``.
    """
    out: dict[str, Any] = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise TaskError(f"an option is KEY=VALUE, got {kv!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_task_config(path: str | Path) -> dict[str, Any]:
    """An organisation's task file (TOML): ``task``, ``data``, ``device`` and an ``[options]`` table.

    Relative ``data`` and ``task = "file.py:Class"`` paths are taken relative to the file.

    Raises
    ------
    TaskError
        Missing or unreadable file, unknown keys.
    """
    import tomllib

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TaskError(f"task config {path}: {exc}") from exc
    unknown = sorted(set(doc) - {"task", "data", "device", "options"})
    if unknown:
        raise TaskError(f"task config {path}: unknown keys {unknown} (expected task, data, device, [options])")
    if "data" in doc and not Path(doc["data"]).is_absolute():
        doc["data"] = str(path.parent / doc["data"])
    task = doc.get("task")
    if isinstance(task, str) and ".py:" in task and not Path(task.rpartition(":")[0]).is_absolute():
        doc["task"] = str(path.parent / task)
    return doc


def node_config_value(value: Any) -> str:
    """``value`` written as a Flower ``--node-config`` value (TOML: numbers and booleans bare, strings quoted).

    Raises
    ------
    TaskError
        A string holding both quote characters, or a value that is no scalar (Flower's
        node-config parser takes neither).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if '"' not in value and "\\" not in value:
            return f'"{value}"'
        if "'" not in value:
            return f"'{value}'"
    raise TaskError(f"{value!r} cannot be a node-config value (a number, boolean or string without both quote kinds)")


def task_node_config(spec: TaskSpec, device: str = "cpu", threads: int | None = None) -> dict[str, str]:
    """Node-config entries naming an organisation's own task: ``task``, ``data``, ``option.<key>``, ``device``, ``threads``."""
    out = {"task": node_config_value(spec.name), "device": node_config_value(device)}
    if spec.data is not None:
        out["data"] = node_config_value(str(Path(spec.data).resolve()))
    for key, value in spec.options.items():
        out[f"option.{key}"] = node_config_value(value)
    if threads is not None:
        out["threads"] = str(int(threads))
    return out


def task_from_node_config(nc: Mapping[str, Any]) -> tuple[TaskSpec, str]:
    """The organisation's own task and device from its node config.

    Keys: ``task`` (name), ``data``, ``option.<key>`` (one task option each) or
    ``task-options`` (a JSON object), ``device``, or ``task-config`` (a TOML file with the
    same, see :func:`read_task_config`); a key given directly wins over the file.

    Raises
    ------
    TaskError
        No task named, options that are not a JSON object.
    """
    doc = read_task_config(str(nc["task-config"])) if "task-config" in nc else {}
    name = str(nc.get("task", doc.get("task", "")))
    if not name:
        raise TaskError("this organisation names no task: pass --task (node config task=...) or --task-config FILE")
    options = dict(doc.get("options", {}))
    if "task-options" in nc:
        try:
            extra = json.loads(str(nc["task-options"]))
        except json.JSONDecodeError as exc:
            raise TaskError(f"node config task-options is not JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise TaskError("node config task-options must be a JSON object")
        options.update(extra)
    options.update({k[len("option."):]: v for k, v in nc.items() if k.startswith("option.")})
    data = nc.get("data", doc.get("data"))
    return TaskSpec(name, options, str(data) if data not in (None, "") else None), str(nc.get("device", doc.get("device", "cpu")))


def simulated_federation(
    spec: TaskSpec, orgs: int, data: list[str] | None = None
) -> tuple[list[TaskSpec], list[str], FederationSpec]:
    """``orgs`` simulated organisations of one task: their own specs, names and the federation spec they share.

    Each organisation's spec is ``spec.for_org(i, orgs)``, with ``data[i]`` as its data
    when ``data`` lists one path per organisation; names are the tasks' own
    (:attr:`Task.name`) or ``org-<i>``, made unique. The federation spec is derived from
    organisation 0's model, and every other organisation is checked against it.

    Raises
    ------
    TaskError
        A task that cannot be loaded, or organisations whose tables differ.
    """
    if orgs < 1:
        raise TaskError(f"a federation has at least one organisation, got {orgs}")
    # a simulation gives each organisation its index and their number itself: an option saying otherwise is refused
    if "orgs" in spec.options and spec.options["orgs"] != orgs:
        raise TaskError(f"--option orgs={spec.options['orgs']} contradicts the {orgs} simulated organisations: "
                        "set their number with --orgs")
    if "org" in spec.options and orgs > 1:
        raise TaskError(f"--option org={spec.options['org']}: a simulation gives each of its {orgs} organisations "
                        f"its own index (org 0 to {orgs - 1})")
    if data is not None and len(data) != orgs:
        raise TaskError(f"{len(data)} data paths for {orgs} organisations")
    specs = [spec.for_org(i, orgs) for i in range(orgs)]
    if data is not None:
        specs = [TaskSpec(s.name, s.options, d) for s, d in zip(specs, data)]
    tasks = [load_task(s) for s in specs]
    federation = tasks[0].federation_spec()
    names: list[str] = []
    for i, task in enumerate(tasks):
        if i:
            try:
                federation.check(task.table_specs())
            except ValueError as exc:
                raise TaskError(f"simulated organisation {i}: {exc}") from exc
        base = task.name or f"org-{i}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return specs, names, federation
