"""Evaluation metrics in plain numpy (no scikit-learn dependency)."""

from __future__ import annotations

import numpy as np


def micro_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Micro-averaged average precision of a multi-label prediction.

    Every (example, label) pair is one binary decision; pairs are ranked by score and the
    precision is averaged at the rank of every positive pair (the area under the
    precision-recall step curve, as scikit-learn's ``average_precision_score(...,
    average="micro")``).

    Parameters
    ----------
    targets : np.ndarray
        0/1 matrix ``(n, C)``.
    scores : np.ndarray
        Real-valued scores, same shape.

    Returns
    -------
    float
        Average precision in [0, 1]; 0.0 when there is no positive pair.
    """
    y = np.asarray(targets).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    npos = int(y.sum())
    if npos == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    # Ties share one threshold: evaluate precision/recall at the last index of each run.
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / npos
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def accuracy(targets: np.ndarray, logits: np.ndarray) -> float:
    """Share of examples whose arg-max class equals the target."""
    if len(targets) == 0:
        return 0.0
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(targets)))
