"""The common container of federated bag-of-ids data.

Every built-in data set (:mod:`fedembed.data.movies`, :mod:`fedembed.data.synthetic`)
produces a :class:`FederatedData`: one shared id vocabulary (the rows of the shared
embedding table) and, per organisation, an :class:`OrgData` with its own target and its
train/val/test :class:`Bags`.

A :class:`Bags` holds examples in CSR form: the ids of example ``i`` are
``ids[offsets[i]:offsets[i + 1]]``, which is exactly what ``nn.EmbeddingBag`` consumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedembed.errors import FedembedError

log = logging.getLogger(__name__)

KINDS = ("multilabel", "multiclass")


class DataError(FedembedError, ValueError):
    """A data set cannot be built as asked (bad arguments, too few examples, ...)."""


@dataclass
class Bags:
    """Bag-of-ids examples in CSR form.

    Attributes
    ----------
    offsets : np.ndarray
        int64, shape ``(n + 1,)``, non-decreasing, ``offsets[0] == 0`` and
        ``offsets[-1] == len(ids)``.
    ids : np.ndarray
        int64, the concatenated ids of all examples.
    targets : np.ndarray
        float32 ``(n, C)`` multi-hot for a ``"multilabel"`` target, int64 ``(n,)`` class
        indices for a ``"multiclass"`` target.
    """

    offsets: np.ndarray
    ids: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.targets = np.asarray(self.targets)
        if self.offsets.ndim != 1 or len(self.offsets) == 0:
            raise DataError(f"offsets must be a 1-d array of length n + 1, got shape {self.offsets.shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise DataError(
                f"offsets must start at 0 and end at len(ids)={len(self.ids)}, "
                f"got {self.offsets[0]} .. {self.offsets[-1]}"
            )
        if len(self.targets) != len(self.offsets) - 1:
            raise DataError(f"{len(self.offsets) - 1} examples in offsets but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Number of ids in each example, int64 ``(n,)``."""
        return np.diff(self.offsets)

    def unique_ids(self) -> np.ndarray:
        """The sorted distinct ids used by these examples (the table rows they touch)."""
        return np.unique(self.ids)

    def subset(self, idx: np.ndarray) -> Bags:
        """The examples ``idx`` (in that order), as a new :class:`Bags` with copied arrays.

        Parameters
        ----------
        idx : np.ndarray
            Integer indices of examples, ``0 <= idx < len(self)``; repeats are allowed.

        Returns
        -------
        Bags
            ``len(idx)`` examples; example ``j`` is example ``idx[j]`` of ``self``.
        """
        idx = np.asarray(idx)
        if idx.dtype == bool:
            raise DataError("subset() takes integer indices, not a boolean mask: use np.flatnonzero(mask)")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"subset indices must lie in [0, {len(self)}), got {idx.min()} .. {idx.max()}")
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # position k of the output comes from starts[j] + (k - offsets[j]) for its example j
        pos = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
        return Bags(offsets, self.ids[pos], self.targets[idx].copy())


@dataclass
class OrgData:
    """One organisation's private data and task.

    Attributes
    ----------
    name : str
        Human-readable name, e.g. ``"France"`` or ``"France-1990s"``.
    target : str
        What it predicts, e.g. ``"genres"``, ``"decade"``, ``"meter"``, ``"class"``.
    kind : str
        ``"multilabel"`` (targets are float32 multi-hot) or ``"multiclass"`` (int64).
    num_classes : int
        Output width of the organisation's head.
    label_names : list[str]
        Name of each class, ``len(label_names) == num_classes``.
    train, val, test : Bags
        Disjoint splits of the organisation's examples.
    """

    name: str
    target: str
    kind: str
    num_classes: int
    label_names: list[str]
    train: Bags
    val: Bags
    test: Bags

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"organisation {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.label_names) != self.num_classes:
            raise DataError(
                f"organisation {self.name!r}: {self.num_classes} classes but {len(self.label_names)} label names"
            )


@dataclass
class FederatedData:
    """Organisations sharing one id vocabulary (the rows of the shared table).

    Attributes
    ----------
    vocab_size : int
        Number of rows of the shared table; every id of every organisation is below it.
    orgs : list[OrgData]
        The organisations, in rank order.
    id_names : list[str] | None
        Human-readable name of each id (``len == vocab_size``), or None (synthetic ids).
    """

    vocab_size: int
    orgs: list[OrgData]
    id_names: list[str] | None = None


def split_indices(
    n: int, rng: np.random.Generator, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Randomly split ``range(n)`` into disjoint train/val/test index arrays.

    Parameters
    ----------
    n : int
        Number of examples.
    rng : np.random.Generator
        Source of the permutation (the split is deterministic given its state).
    fractions : tuple of float
        Train, val and test fractions, non-negative, summing to 1.

    Returns
    -------
    tuple of np.ndarray
        ``(train, val, test)`` int64 indices, each sorted, together a partition of
        ``range(n)``. Sizes are ``round(f * n)`` for train and val, the rest for test; when
        ``n >= 3`` every split with a positive fraction gets at least one example.
    """
    if n < 0:
        raise DataError(f"cannot split a negative number of examples ({n})")
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise DataError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    sizes = [int(round(f[0] * n)), int(round(f[1] * n))]
    sizes.append(n - sum(sizes))
    if sizes[2] < 0:  # rounding overshoot
        sizes[0] += sizes[2]
        sizes[2] = 0
    if n >= 3:  # give every requested split at least one example, taken from the largest
        for k in range(3):
            if f[k] > 0 and sizes[k] == 0:
                sizes[int(np.argmax(sizes))] -= 1
                sizes[k] = 1
    perm = rng.permutation(n).astype(np.int64)
    a, b = sizes[0], sizes[0] + sizes[1]
    return np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:])
