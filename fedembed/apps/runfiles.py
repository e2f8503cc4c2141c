"""The files of a deployed run in the coordinator's state directory.

:class:`DeployedRunFiles` is what the deployed ServerApp writes there (``progress.jsonl``
and the outputs); :func:`resume_round` reads the last checkpoint round back;
:func:`tables_digest` fingerprints the tables for resume checks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class DeployedRunFiles:
    """What the deployed ServerApp writes into the coordinator's state directory.

    Parameters
    ----------
    state_dir : Path
        The coordinator's state directory (run config ``state-dir``).
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.coordinator_dir = self.state_dir / "coordinator"
        self.progress = self.state_dir / "progress.jsonl"
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, doc: dict[str, Any]) -> None:
        with open(self.progress, "a", encoding="utf-8") as f:
            f.write(json.dumps(doc, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_start(self, coordinator: Any) -> None:
        """Record where the ServerApp starts: first round, a digest of its tables, a resumed recipe's changes."""
        self._append({"event": "start", "round": coordinator.start_round,
                      "tables_sha256": tables_digest(coordinator.tables.tables),
                      "recipe_changes": list(getattr(coordinator, "recipe_changes", [])), "time": time.time()})

    def on_round(self, entry: dict) -> None:
        """Append one finished round (its log entry) to ``progress.jsonl``."""
        self._append({"event": "closing" if entry.get("closing") else "round", **entry, "time": time.time()})

    def on_done(self, coordinator: Any) -> None:
        """Write ``metrics.json``, ``embeddings.npz``, ``report.png``; mark the run done."""
        coordinator.log.write(self.state_dir, coordinator.tables.tables)
        self._append({"event": "done", "rounds": coordinator.cfg.rounds, "time": time.time()})


def tables_digest(tables: dict[str, Any]) -> str:
    """SHA-256 over table names, shapes, dtypes and values (resume checks)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in sorted(tables):
        a = np.ascontiguousarray(tables[name])
        h.update(f"{name}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def resume_round(state_dir: Path) -> int:
    """The last round checkpointed in ``state_dir`` (0: none)."""
    from fedembed.store import load_latest_checkpoint

    ckpt = load_latest_checkpoint(Path(state_dir) / "coordinator")
    return 0 if ckpt is None else ckpt.round
