"""The run log: metrics.json, embeddings.npz and report.png.

``metrics.json`` schema::

    {"config": {...},
     "rounds": [{"round", "clients", "upload_bytes", "download_bytes",
                 "dense_upload_bytes", "wall_seconds", "rejected": {org: reason},
                 "stages": {stage: {"seconds", "upload_bytes", "download_bytes"}},
                 "metrics": {org: {name: value}}}],
     "final": {org: {name: value}, "mean": {name: value}}}

``metrics`` of round r are measured on each organisation's own validation (``val_*``)
and test data after round r's update. Byte counts are serialized sizes of what was sent.

``metrics.json`` is strict JSON: a non-finite metric (NaN, inf) is never stored (it is
dropped with a warning naming the organisation), means are over finite values only, and
any other non-finite number that reaches the document is written as ``null``.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedembed.store import atomic_write, atomic_write_npz

log = logging.getLogger(__name__)


@dataclass
class RunLog:
    """Collects per-round figures and writes the run's output files."""

    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def new_round(self, round_: int) -> dict[str, Any]:
        """Start the entry of ``round_``."""
        entry: dict[str, Any] = {
            "round": round_,
            "clients": 0,
            "upload_bytes": 0,
            "download_bytes": 0,
            "dense_upload_bytes": 0,
            "wall_seconds": 0.0,
            "rejected": {},
            "stages": {},
            "metrics": {},
        }
        self.rounds.append(entry)
        return entry

    def set_metrics(self, round_: int, org: str, metrics: dict[str, float]) -> None:
        """Record ``org``'s evaluation after ``round_`` (0 = before training).

        Parameters
        ----------
        round_ : int
            The round the evaluation follows (0: before training).
        org : str
            The organisation's name.
        metrics : dict of str to float
            Its metrics; values that are not finite numbers are dropped, with a warning.
        """
        metrics = _finite_metrics(metrics, f"metrics of {org!r} after round {round_}")
        if round_ == 0:
            self.initial[org] = metrics
            return
        for e in self.rounds:
            if e["round"] == round_:
                e["metrics"][org] = metrics
                return

    def final(self) -> dict[str, Any]:
        """Metrics after the last round per organisation, and their mean."""
        if not self.rounds:
            return {"mean": {}}
        # finite values only, whatever a resumed log from before this check may hold
        last = {org: _finite_metrics(m) for org, m in self.rounds[-1]["metrics"].items()}
        out: dict[str, Any] = {org: dict(m) for org, m in sorted(last.items())}
        names = sorted({k for m in last.values() for k in m})
        out["mean"] = {k: float(np.mean([m[k] for m in last.values() if k in m])) for k in names}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json document."""
        d = {"config": self.config, "rounds": self.rounds, "final": self.final(), "initial": self.initial}
        d.update(self.extra)
        return d

    def write(self, out_dir: Path, tables: dict[str, np.ndarray] | None) -> None:
        """Write metrics.json, embeddings.npz (if tables) and report.png into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = json.dumps(_finite_json(self.to_dict()), indent=1, default=_json_default, allow_nan=False)
        atomic_write(out_dir / "metrics.json", doc.encode())
        if tables is not None:
            atomic_write_npz(out_dir / "embeddings.npz", tables)
        try:
            plot_report(self.to_dict(), out_dir / "report.png")
        except Exception as exc:  # a plot must never cost the run its results
            log.error("could not draw report.png: %s", exc)


def _finite_metrics(metrics: dict[str, Any], what: str | None = None) -> dict[str, float]:
    """The entries of ``metrics`` that are finite numbers, as floats; the others are logged (if ``what``)."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if math.isfinite(f):
            kept[k] = f
        else:
            dropped.append(f"{k}={v!r}")
    if dropped and what is not None:
        log.warning("%s: not finite, not stored: %s", what, ", ".join(dropped))
    return kept


def _finite_json(o: Any) -> Any:
    """``o`` with every non-finite float (numpy's included) replaced by None: strict JSON."""
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def plot_report(doc: dict[str, Any], path: Path) -> None:
    """Draw per-round score per organisation and bytes per round into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = doc["rounds"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    orgs = sorted({o for r in rounds for o in r["metrics"]})
    for org in orgs:
        xs = [r["round"] for r in rounds if org in r["metrics"]]
        ys = [r["metrics"][org].get("score", np.nan) for r in rounds if org in r["metrics"]]
        ax.plot(xs, ys, marker="o", label=org)
    if orgs:
        xs = [r["round"] for r in rounds if r["metrics"]]
        ys = [np.mean([m.get("score", np.nan) for m in r["metrics"].values()]) for r in rounds if r["metrics"]]
        ax.plot(xs, ys, color="black", linewidth=2.5, label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel("test score (primary metric)")
    ax.set_title(f"score per organisation — mode {doc['config'].get('mode', '?')}")
    if len(orgs) <= 12:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    xs = np.array([r["round"] for r in rounds])
    up = np.array([r["upload_bytes"] for r in rounds]) / 2**20
    down = np.array([r["download_bytes"] for r in rounds]) / 2**20
    dense = np.array([r["dense_upload_bytes"] for r in rounds]) / 2**20
    w = 0.28
    ax.bar(xs - w, up, w, label="upload")
    ax.bar(xs, down, w, label="download")
    ax.bar(xs + w, dense, w, label="dense float32 upload", alpha=0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("MiB (all organisations)")
    ax.set_title("bytes per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()  # written like every other output: atomically, owner-only
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
