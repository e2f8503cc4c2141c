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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedembed.store import atomic_write

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
        """Record ``org``'s evaluation after ``round_`` (0 = before training)."""
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
        last = self.rounds[-1]["metrics"]
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
        atomic_write(out_dir / "metrics.json", json.dumps(self.to_dict(), indent=1, default=_json_default).encode())
        if tables is not None:
            import io

            buf = io.BytesIO()
            np.savez(buf, **tables)
            atomic_write(out_dir / "embeddings.npz", buf.getvalue())
        try:
            plot_report(self.to_dict(), out_dir / "report.png")
        except Exception as exc:  # a plot must never cost the run its results
            log.error("could not draw report.png: %s", exc)


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
