"""Atomic state on disk: the coordinator's checkpoints and each organisation's own state.

Every file is written to a temporary name in the same directory, flushed, fsync'ed and
renamed over the old one, so a crash leaves either the old or the new file, never half of
one. Coordinator checkpoints carry a SHA-256 of their bytes; a corrupt or partial one is
detected on load and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedembed.tables import VersionedTables, init_table

log = logging.getLogger(__name__)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingWriter:
    """A write-only, unseekable file that hashes what passes through (zipfile then streams)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def read(self, *args: Any) -> bytes:  # numpy takes objects with ``read`` for open files
        raise io.UnsupportedOperation("write-only")


def atomic_write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` as an ``.npz`` to ``path`` atomically; returns the file's SHA-256 (hex).

    The archive is streamed to the temporary file and hashed on the way, so no copy of
    the arrays' bytes is held in memory (a 1M x 64 table would otherwise cost two more
    table-sized buffers at every checkpoint).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        np.savez(writer, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return writer.sha256.hexdigest()


def file_sha256(path: Path, chunk: int = 8 * 2**20) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ coordinator checkpoints


@dataclass
class Checkpoint:
    """What the coordinator needs to resume: tables, row versions, optimizer state, config."""

    tables: VersionedTables
    optimizer_state: dict[str, np.ndarray]
    config: dict[str, Any]

    @property
    def round(self) -> int:
        """The last finished round."""
        return self.tables.version


_CKPT = re.compile(r"^checkpoint-(\d+)\.npz$")


def save_checkpoint(directory: Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``checkpoint-<round>.npz`` (+ ``.sha256``) atomically and prune old ones.

    Parameters
    ----------
    directory : Path
        The coordinator's state directory.
    ckpt : Checkpoint
        What to save.
    keep : int
        How many of the newest checkpoints to keep.
    """
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    for name, t in ckpt.tables.tables.items():
        arrays[f"table/{name}"] = t
        arrays[f"version/{name}"] = ckpt.tables.versions[name]
    for name, s in ckpt.optimizer_state.items():
        arrays[f"opt/{name}"] = s
    meta = {"round": ckpt.round, "config": ckpt.config}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = directory / f"checkpoint-{ckpt.round:06d}.npz"
    digest = atomic_write_npz(path, arrays)
    atomic_write(path.with_suffix(".sha256"), digest.encode())
    for old in sorted(_list_checkpoints(directory))[:-keep]:
        for p in (old, old.with_suffix(".sha256")):
            p.unlink(missing_ok=True)
    return path


def _list_checkpoints(directory: Path) -> list[Path]:
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if _CKPT.match(p.name))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; raises ``ValueError`` if corrupt."""
    path = Path(path)
    digest_file = path.with_suffix(".sha256")
    if not digest_file.exists() or digest_file.read_text().strip() != file_sha256(path):
        raise ValueError(f"checkpoint {path} fails its SHA-256 check (partial or corrupt)")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        tables = {k[6:]: z[k] for k in z.files if k.startswith("table/")}
        versions = {k[8:]: z[k] for k in z.files if k.startswith("version/")}
        opt = {k[4:]: z[k] for k in z.files if k.startswith("opt/")}
    return Checkpoint(VersionedTables(tables, versions, int(meta["round"])), opt, meta["config"])


def load_latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None; corrupt ones are logged and skipped."""
    for path in reversed(_list_checkpoints(directory)):
        try:
            ckpt = load_checkpoint(path)
        except (ValueError, OSError, KeyError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        log.info("resuming from %s (round %d)", path.name, ckpt.round)
        return ckpt
    return None


# ------------------------------------------------------------------ organisation state


class OrgState:
    """One organisation's private state directory.

    Holds the private head and its optimizer state (``head.pt``) and the cache of the
    global tables at the version last synced (``tables.npz`` + ``tables.json``). Nothing
    here is ever put into a message.

    Parameters
    ----------
    directory : Path
        The organisation's own state directory (created if missing).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    # head -----------------------------------------------------------------
    def load_head(self) -> dict[str, Any] | None:
        """``{"head": state_dict, "optimizer": state_dict, ...}`` or None for a new org."""
        p = self.dir / "head.pt"
        if not p.exists():
            return None
        try:
            import torch

            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt file: start the head afresh, loudly
            log.error("head state %s unreadable (%s); starting a fresh head", p, exc)
            return None

    def save_head(self, head: dict[str, Any], optimizer: dict[str, Any], round_: int, **extra: Any) -> None:
        """Save the head, its optimizer state and the round atomically."""
        buf = io.BytesIO()
        import torch

        torch.save({"head": head, "optimizer": optimizer, "round": round_, **extra}, buf)
        atomic_write(self.dir / "head.pt", buf.getvalue())

    # table cache ----------------------------------------------------------
    def load_tables(
        self, shapes: dict[str, tuple[int, int]], seed: int, scale: float, key: str
    ) -> tuple[dict[str, np.ndarray], int]:
        """The cached global tables and their version; version 0 tables if none fits.

        The cache is a base file plus the row syncs applied since it was written (each
        checked against its SHA-256). ``key`` identifies the run (task, seed, init scale):
        a cache of another run is never reused.
        """
        meta_p, data_p = self.dir / "tables.json", self.dir / "tables.npz"
        if meta_p.exists() and data_p.exists():
            try:
                meta = json.loads(meta_p.read_text())
                if meta.get("key") == key and meta.get("sha256") == file_sha256(data_p):
                    with np.load(data_p, allow_pickle=False) as z:
                        tables = {n: z[n] for n in shapes}
                    if all(tables[n].shape == tuple(s) for n, s in shapes.items()):
                        for d in meta.get("deltas", []):
                            self._apply_delta(tables, d)
                        return tables, int(meta["version"])
                log.warning("table cache in %s belongs to another run or is corrupt; rebuilding", self.dir)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("table cache in %s unreadable (%s); rebuilding", self.dir, exc)
        return {n: init_table(n, s, seed, scale) for n, s in shapes.items()}, 0

    def _apply_delta(self, tables: dict[str, np.ndarray], d: dict[str, Any]) -> None:
        path = self.dir / d["file"]
        if file_sha256(path) != d["sha256"]:
            raise ValueError(f"{path.name} does not match its checksum")
        with np.load(path, allow_pickle=False) as z:
            for name in tables:
                if f"{name}.ids" in z.files:
                    tables[name][z[f"{name}.ids"]] = z[f"{name}.rows"]

    def save_tables(self, tables: dict[str, np.ndarray], version: int, key: str) -> None:
        """Save the whole cache of the global tables at ``version`` atomically (a new base)."""
        digest = atomic_write_npz(self.dir / "tables.npz", tables)
        meta = {"version": version, "key": key, "sha256": digest, "deltas": []}
        atomic_write(self.dir / "tables.json", json.dumps(meta).encode())
        for old in self.dir.glob("tables.delta-*.npz"):
            old.unlink(missing_ok=True)

    def save_sync(
        self, tables: dict[str, np.ndarray], sync: dict[str, Any], version: int, key: str, max_share: float = 0.5
    ) -> None:
        """Record a row sync applied to the cache: only the synced rows are written.

        The cache becomes the base file plus a list of syncs; once the syncs hold more
        than ``max_share`` of the rows, the whole table is written again as the new base.
        At 10^6 rows, writing ~1% of them instead of the table saves most of a second per
        round. Crash-safe: the metadata, written last and atomically, names what counts.
        """
        meta_p = self.dir / "tables.json"
        try:
            meta = json.loads(meta_p.read_text()) if meta_p.exists() else None
        except (OSError, ValueError):
            meta = None
        total = sum(t.shape[0] for t in tables.values())
        new_rows = sum(int(rs.ids.shape[0]) for rs in sync.values())
        if meta is None or meta.get("key") != key or not (self.dir / "tables.npz").exists():
            return self.save_tables(tables, version, key)
        deltas = list(meta.get("deltas", []))
        if sum(d["rows"] for d in deltas) + new_rows > max_share * total:
            return self.save_tables(tables, version, key)
        if new_rows:
            arrays: dict[str, np.ndarray] = {}
            for name, rs in sync.items():
                arrays[f"{name}.ids"], arrays[f"{name}.rows"] = rs.ids, rs.values
            name = f"tables.delta-{version}.npz"
            digest = atomic_write_npz(self.dir / name, arrays)
            deltas.append({"file": name, "sha256": digest, "rows": new_rows})
        meta = {"version": version, "key": key, "sha256": meta["sha256"], "deltas": deltas}
        atomic_write(meta_p, json.dumps(meta).encode())
