"""Atomic state on disk: the coordinator's checkpoints and each organisation's own state.

Every file is written to a temporary name in the same directory, flushed, fsync'ed and
renamed over the old one, so a crash leaves either the old or the new file, never half of
one. Coordinator checkpoints carry a SHA-256 of their bytes; a corrupt or partial one is
detected on load and the previous one is used; when every kept checkpoint is unusable the
coordinator refuses to start rather than silently starting over.

Every file written here is private by default: created with mode 0600 (``os.open`` with
that mode, never widened then narrowed), in directories created 0700. The organisation's
head, optimizer state, table cache and secure-aggregation session, and the coordinator's
checkpoints, are all written through :func:`atomic_write` / :func:`atomic_write_npz`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedembed.errors import FedembedError
from fedembed.tables import VersionedTables, init_table



class HeadModel(Protocol):
    """What a saved head is checked against (a :class:`fedembed.model.SplitModel`; the store imports no torch)."""

    def head_state_dict(self) -> dict[str, Any]:
        """The private head's state."""
        ...

    def head_parameters(self) -> list[Any]:
        """The head's trainable parameters."""
        ...

log = logging.getLogger(__name__)

PRIVATE = 0o600
"""Mode of every file written here unless a caller asks otherwise: owner read/write only."""
PRIVATE_DIR = 0o700
"""Mode of the directories created here (existing ones are left as they are)."""


def make_private_dir(directory: Path) -> Path:
    """Create ``directory`` (and missing parents) with mode 0700; an existing one is kept as is.

    Parameters
    ----------
    directory : Path
        The directory.

    Returns
    -------
    Path
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return directory


def bind_private_socket(path: Path, kind: int) -> socket.socket:
    """A Unix socket of ``kind`` bound at ``path`` and private from its creation (mode 0600, under umask 0177).

    The caller removes a stale file at ``path`` first.
    """
    sock = socket.socket(socket.AF_UNIX, kind)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, PRIVATE)
    return sock


@contextmanager
def _new_file(path: Path, mode: int) -> Iterator[Any]:
    """A fresh temporary file next to ``path``, created with ``mode``; renamed over ``path`` on success.

    The file is created by ``os.open(..., O_CREAT | O_EXCL, mode)`` under a random name,
    so it has ``mode`` (less the umask) from its first byte: never another file's mode,
    never a symlink followed. On an error it is removed and ``path`` is left untouched.
    """
    path = Path(path)
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    Parameters
    ----------
    path : Path
        Destination; its directory is created 0700 if missing.
    data : bytes
        The whole content.
    mode : int
        Permission bits the file is created with (before the umask); private (0600) by
        default. Pass e.g. ``0o644`` only for files meant to be shared.
    """
    with _new_file(path, mode) as f:
        f.write(data)


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


def atomic_write_npz(path: Path, arrays: dict[str, np.ndarray], mode: int = PRIVATE) -> str:
    """Write ``arrays`` as an ``.npz`` to ``path`` atomically; returns the file's SHA-256 (hex).

    The archive is streamed to the temporary file and hashed on the way, so no copy of
    the arrays' bytes is held in memory (a 1M x 64 table would otherwise cost two more
    table-sized buffers at every checkpoint).

    Parameters
    ----------
    path : Path
        Destination; its directory is created 0700 if missing.
    arrays : dict of str to ndarray
        The arrays (no object arrays: they are read back with ``allow_pickle=False``).
    mode : int
        Permission bits the file is created with; private (0600) by default.
    """
    with _new_file(path, mode) as f:
        writer = _HashingWriter(f)
        np.savez(writer, **arrays)
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
    # Staged, digest, then renamed: a crash at any point leaves no checkpoint-N.npz without
    # its digest, so an interrupted first checkpoint is no checkpoint (a fresh start), never
    # an unverifiable one that would stop the next start.
    staged = path.with_name(f".{path.name}.staged")
    digest = atomic_write_npz(staged, arrays)
    atomic_write(path.with_suffix(".sha256"), digest.encode())
    os.replace(staged, path)
    _fsync_dir(directory)
    for old in sorted(_list_checkpoints(directory))[:-keep]:
        for p in (old, old.with_suffix(".sha256")):
            p.unlink(missing_ok=True)
    return path


def _list_checkpoints(directory: Path) -> list[Path]:
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if _CKPT.match(p.name))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file.

    Parameters
    ----------
    path : Path
        A ``checkpoint-<round>.npz`` with its ``.sha256`` next to it.

    Returns
    -------
    Checkpoint
        The checkpoint.

    Raises
    ------
    ValueError
        The file is missing its digest, fails it, or (digest or not) is not a readable
        checkpoint of that round: whatever is wrong with the file, never another error.
    """
    path = Path(path)
    digest_file = path.with_suffix(".sha256")
    try:
        if not digest_file.exists() or digest_file.read_text().strip() != file_sha256(path):
            raise ValueError("fails its SHA-256 check (partial or corrupt)")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            tables = {k[6:]: z[k] for k in z.files if k.startswith("table/")}
            versions = {k[8:]: z[k] for k in z.files if k.startswith("version/")}
            opt = {k[4:]: z[k] for k in z.files if k.startswith("opt/")}
        round_ = _check_checkpoint(path, meta, tables, versions)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} {exc}") from exc
    except Exception as exc:  # BadZipFile, EOFError, TypeError on an .npy, ...: unreadable, not a crash
        raise ValueError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    return Checkpoint(VersionedTables(tables, versions, round_), opt, meta["config"])


def _check_checkpoint(path: Path, meta: Any, tables: dict[str, np.ndarray], versions: dict[str, np.ndarray]) -> int:
    """The round of a decoded checkpoint whose parts fit together; ``ValueError`` otherwise."""
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError("has no run metadata")
    round_ = meta.get("round")
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise ValueError(f"names no valid round ({round_!r})")
    named = _CKPT.match(path.name)
    if named and int(named.group(1)) != round_:
        raise ValueError(f"holds round {round_}, not the round of its name")
    if not tables or set(tables) != set(versions):
        raise ValueError("does not hold one version array per table")
    for name, t in tables.items():
        v = versions[name]
        if t.ndim != 2 or v.shape != (t.shape[0],) or not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"table {name!r} and its row versions do not fit together")
    return round_


def load_latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; None when there is none at all.

    A corrupt or unreadable newest checkpoint is skipped, with a warning, for the one
    before it. When checkpoints exist but none of them is usable, starting afresh would
    silently throw the trained tables away, so this refuses instead.

    Parameters
    ----------
    directory : Path
        The directory holding ``checkpoint-<round>.npz`` files.

    Returns
    -------
    Checkpoint or None
        The newest usable checkpoint, or None when the directory holds no checkpoint.

    Raises
    ------
    ValueError
        Checkpoints exist but none is usable; the message lists each and what to do.
    """
    found = list(reversed(_list_checkpoints(directory)))
    problems: list[str] = []
    for path in found:
        try:
            ckpt = load_checkpoint(path)
        except (ValueError, OSError) as exc:
            log.warning("checkpoint %s is unusable: %s", path.name, exc)
            problems.append(f"{path.name}: {exc}")
            continue
        if problems:
            log.warning(
                "resuming from the older checkpoint %s (round %d): %d newer one(s) unusable, their rounds run again",
                path.name, ckpt.round, len(problems),
            )
        else:
            log.info("resuming from %s (round %d)", path.name, ckpt.round)
        return ckpt
    if found:
        raise ValueError(
            f"{directory} holds {len(found)} checkpoint(s) and none of them is usable, so the run cannot "
            "resume; refusing to start over at round 1 with fresh tables, which would silently discard "
            "the trained ones. Found: " + "; ".join(problems) + ". What to do: restore a good "
            f"checkpoint-<round>.npz with its .sha256 into {directory} (from a backup) and start again, or, "
            f"to really start a new run, move {directory} away or give a new --state-dir."
        )
    return None


# ------------------------------------------------------------------ organisation state


class RoundAnswered(FedembedError, ValueError):
    """A ``train`` message of a round this organisation already answered, or of an earlier one (or its record of
    the rounds it answered cannot be read, so it cannot tell)."""


ANSWERED = "answered.json"
"""What an organisation answered, per run: ``{"runs": {run_key: {"round", "evaluated"}}, "secure"}``."""


def _answered(state_dir: Path) -> dict[str, Any]:
    """The organisation's record of what it answered (:data:`ANSWERED`; empty for a new organisation).

    Every run it answered keeps its entry (``round``: the last round it contributed an
    update to; ``evaluated``: the last round it reported metrics for), and ``secure`` says
    whether it ever contributed to a secure sum. A record of the older single-run form
    (``{"run_key", "round", "secure"}``) is read as that one run.

    Raises
    ------
    RoundAnswered
        The record is there but cannot be read or is not one: it is never taken for none.
    """
    path = Path(state_dir) / ANSWERED
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"runs": {}, "secure": False}
    except (OSError, ValueError) as exc:
        doc = exc
    if isinstance(doc, dict) and isinstance(doc.get("run_key"), str) and type(doc.get("round")) is int:
        doc = {"runs": {doc["run_key"]: {"round": doc["round"], "evaluated": doc["round"]}},
               "secure": doc.get("secure") is True}
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not (isinstance(runs, dict) and all(isinstance(k, str) and isinstance(v, dict)
                                           and type(v.get("round")) is int and type(v.get("evaluated")) is int
                                           for k, v in runs.items())):
        raise RoundAnswered(
            f"{path}, the record of the rounds this organisation answered, is damaged ({doc!r:.200}); without it a "
            "round it answered could be asked again: restore it, or remove it to accept that"
        )
    return {"runs": runs, "secure": doc.get("secure") is True}


def _write_answered(state_dir: Path, doc: dict[str, Any]) -> None:
    atomic_write(Path(state_dir) / ANSWERED, json.dumps(doc).encode())


def check_round_open(state_dir: Path, run_key: str, round_: int) -> None:
    """Refuse ``round_`` if this organisation already contributed to it, or to a later round, of the run.

    An organisation contributes to each round's sum once, in increasing rounds, plain or
    secure, whatever kind of secure session asks: a coordinator that could ask for the same
    round's update twice, in two secure sums, would get two sums over different parties
    (everyone in one, everyone but the target in the other, its 'dropout' recovered), and
    their difference would be the target's update; a plain round asked again would train
    the head twice on one round after its old sync rewound the table cache. Checked before
    anything of a ``train`` message is applied, and again when the contribution is recorded
    (:func:`claim_round`). Every run keeps its own record: a message of another run in
    between does not reopen this one's rounds.

    No record (a new organisation) leaves every round open. A record that is there but
    cannot be read or is not one is never taken for none: the organisation refuses to
    train until an operator restores it, or removes it and so accepts that a round it
    answered may be asked again.

    Raises
    ------
    RoundAnswered
        ``round_`` is not after the last round answered in this run, or the record is damaged.
    """
    _check_round(_answered(state_dir), run_key, round_)


def _check_round(doc: dict[str, Any], run_key: str, round_: int) -> None:
    """:func:`check_round_open` on a record already read."""
    run = doc["runs"].get(run_key)
    if run is not None and round_ <= run["round"]:
        raise RoundAnswered(
            f"round {round_} refused: round {run['round']} of this run was already answered, and an organisation "
            "contributes to each round's sum once, in increasing rounds (two secure sums of one round's update over "
            "different parties would reveal the difference)"
        )


def claim_round(state_dir: Path, run_key: str, round_: int, secure: bool = False) -> None:
    """Record that this organisation contributes to ``round_`` of the run, written before the reply leaves.

    The caller holds the organisation's lock (one message at a time: the secure stages' lock,
    :func:`fedembed.secagg.client.claim_round` for a plain round's update). ``secure``: the
    contribution is inside a secure sum; once one is, the organisation stays marked secure
    (:func:`contributed_securely`), whatever run later asks.

    Raises
    ------
    RoundAnswered
        ``round_`` is not after the last round answered in this run (:func:`check_round_open`).
    """
    doc = _answered(state_dir)
    _check_round(doc, run_key, round_)
    run = doc["runs"].setdefault(run_key, {"round": 0, "evaluated": 0})
    run["round"] = int(round_)
    run["evaluated"] = max(run["evaluated"], int(round_))
    doc["secure"] = doc["secure"] or bool(secure)
    _write_answered(state_dir, doc)


def check_evaluation_open(state_dir: Path, run_key: str, round_: int, max_runs: int = 0) -> None:
    """Refuse a message of ``round_`` if this organisation reported its metrics for it, or a later round, of the run.

    Every reply carries the organisation's evaluation of the tables it was sent, to full
    precision, and tables chosen by the coordinator make those metrics an oracle on its
    held-out labels (a table of one value everywhere but one row tells how the test
    examples holding that row are labelled). So it reports metrics once per round of a run,
    in increasing rounds, whatever kind of message asks (a ``train`` message, or the
    closing ``evaluate``): a coordinator gets one evaluation per round it runs, not one
    per message it sends. ``max_runs`` (its operator's rule, 0: none) caps how many runs
    it answers at all; each new run is another series of evaluations and updates. Checked
    before anything of the message is applied; :func:`claim_evaluation` records it.

    Raises
    ------
    RoundAnswered
        ``round_`` is not after the last round it reported for in this run, a new run
        beyond ``max_runs``, or the record is damaged.
    """
    _check_evaluation(_answered(state_dir), run_key, round_, max_runs)


def _check_evaluation(doc: dict[str, Any], run_key: str, round_: int, max_runs: int) -> None:
    """:func:`check_evaluation_open` on a record already read."""
    run = doc["runs"].get(run_key)
    if run is None and max_runs and len(doc["runs"]) >= max_runs:
        raise RoundAnswered(f"a new run refused: this organisation answers at most {max_runs} run(s) (max-runs), and "
                            f"has answered {len(doc['runs'])}")
    if run is not None and round_ <= run["evaluated"]:
        raise RoundAnswered(
            f"round {round_} refused: this organisation reported its metrics for round {run['evaluated']} of this run "
            "already, and reports them once per round, in increasing rounds (metrics of tables the coordinator "
            "chooses, asked for again and again, would tell it the organisation's held-out labels)"
        )


def claim_evaluation(state_dir: Path, run_key: str, round_: int, max_runs: int = 0) -> None:
    """Record that this organisation reports its metrics for ``round_`` of the run (see :func:`check_evaluation_open`).

    Written before the reply leaves; the caller holds the organisation's lock.

    Raises
    ------
    RoundAnswered
        As :func:`check_evaluation_open`.
    """
    doc = _answered(state_dir)
    _check_evaluation(doc, run_key, round_, max_runs)
    run = doc["runs"].setdefault(run_key, {"round": 0, "evaluated": 0})
    run["evaluated"] = int(round_)
    _write_answered(state_dir, doc)


def contributed_securely(state_dir: Path) -> bool:
    """Whether this organisation has contributed to a secure sum, in any run.

    A coordinator that turns a secure run plain would get the next round's update in the
    clear, and the run key is the coordinator's to choose: one character more and it is
    "another run". So once an organisation has contributed securely, it refuses plain
    rounds of every run (:func:`fedembed.org.check_plain_allowed`); its operator starts it
    on a new state directory to take part in a plain federation. A damaged record says
    yes (it cannot tell).
    """
    try:
        return _answered(state_dir)["secure"]
    except RoundAnswered:
        return True


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
        self.dir = make_private_dir(Path(directory))

    # head -----------------------------------------------------------------
    def load_head(self, model: HeadModel | None = None) -> dict[str, Any] | None:
        """The saved head, or None for a new organisation or an unusable file.

        An unreadable ``head.pt``, or one that does not fit ``model`` (another model's:
        other parameter names or shapes, or an optimizer state for other parameters), is
        never loaded, never deleted and never silently overwritten: it is renamed to
        ``head.pt.unusable-<time>`` next to it, an error names the file and what is wrong,
        and the organisation goes on with a fresh head.

        Parameters
        ----------
        model : HeadModel, optional
            The model the head is for; when given, the saved head is checked against it.

        Returns
        -------
        dict or None
            ``{"head": state_dict, "optimizer": state_dict, "round": int, ...}``, or None.
        """
        p = self.dir / "head.pt"
        if not p.exists():
            return None
        try:
            import torch

            saved = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or not isinstance(saved.get("head"), dict):
                raise ValueError("not a saved head (no 'head' state dict in it)")
        except Exception as exc:  # corrupt or foreign file: kept aside, the head starts afresh, loudly
            self._set_aside(p, f"is unreadable ({exc})")
            return None
        problem = _head_mismatch(model, saved) if model is not None else None
        if problem is not None:
            self._set_aside(p, f"belongs to another model: {problem}")
            return None
        return saved

    def _set_aside(self, path: Path, why: str) -> Path:
        """Rename an unusable private file to ``<name>.unusable-<time>`` and say so."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dest = path.with_name(f"{path.name}.unusable-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = path.with_name(f"{path.name}.unusable-{stamp}-{n}")
        os.replace(path, dest)
        log.error(
            "%s %s. Moved it aside to %s (kept, not deleted) and starting with a fresh head. "
            "If it is a head you need, it only fits the model it was trained for (same task and "
            "organisation); otherwise delete %s.",
            path, why, dest.name, dest,
        )
        return dest

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
        if meta_p.exists():
            try:
                meta = json.loads(meta_p.read_text())
                if not isinstance(meta, dict):
                    raise ValueError("tables.json is not a cache description")
                if meta.get("key") != key:  # overwritten by the first save of this run
                    log.warning("table cache in %s belongs to another run; starting from version 0", self.dir)
                    return {n: init_table(n, s, seed, scale) for n, s in shapes.items()}, 0
                if meta.get("sha256") != file_sha256(data_p):
                    raise ValueError("tables.npz does not match its checksum")
                with np.load(data_p, allow_pickle=False) as z:
                    tables = {n: z[n] for n in shapes}
                if not all(tables[n].shape == tuple(s) for n, s in shapes.items()):
                    raise ValueError("tables.npz holds tables of other shapes")
                for d in meta.get("deltas", []):
                    self._apply_delta(tables, d)
                return tables, int(meta["version"])
            except Exception as exc:  # any damage: the cache is rebuilt, never half used
                self._discard_tables(exc)
        return {n: init_table(n, s, seed, scale) for n, s in shapes.items()}, 0

    def cache_key(self) -> Any:
        """The run key the table cache belongs to (as ``tables.json`` holds it), or None when it cannot be read."""
        try:
            return json.loads((self.dir / "tables.json").read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    def load_cached_tables(self, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, np.ndarray], int]:
        """The cached tables and their version, whichever run they belong to (version 0: no usable cache)."""
        key = self.cache_key()
        if key is None:
            return {}, 0
        tables, version = self.load_tables(shapes, 0, 0.0, str(key))
        return (tables, version) if version > 0 else ({}, 0)

    def _discard_tables(self, why: Exception) -> None:
        """Drop a corrupt cache's description so the next save starts a new base.

        Without this, the next row sync would be appended to the same broken chain and the
        cache would fail again at the following round, and so on forever.
        """
        (self.dir / "tables.json").unlink(missing_ok=True)
        log.warning(
            "table cache in %s is corrupt (%s): discarded it; the tables start again from version 0 "
            "and the coordinator resends the rows changed since (one round is spent resyncing)",
            self.dir, why,
        )

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
            deltas = list(meta["deltas"]) if isinstance(meta, dict) else []
            synced = sum(int(d["rows"]) for d in deltas)
            usable = isinstance(meta, dict) and meta.get("key") == key and isinstance(meta.get("sha256"), str)
        except (OSError, ValueError, KeyError, TypeError):
            usable = False
        total = sum(t.shape[0] for t in tables.values())
        new_rows = sum(int(rs.ids.shape[0]) for rs in sync.values())
        if not usable or not (self.dir / "tables.npz").exists():
            return self.save_tables(tables, version, key)
        if synced + new_rows > max_share * total:
            return self.save_tables(tables, version, key)
        if new_rows:
            arrays: dict[str, np.ndarray] = {}
            for name, rs in sync.items():
                arrays[f"{name}.ids"], arrays[f"{name}.rows"] = rs.ids, rs.values
            name = f"tables.delta-{version}-{len(deltas)}.npz"  # unique: two syncs at one version never share a file
            digest = atomic_write_npz(self.dir / name, arrays)
            deltas.append({"file": name, "sha256": digest, "rows": new_rows})
        meta = {"version": version, "key": key, "sha256": meta["sha256"], "deltas": deltas}
        atomic_write(meta_p, json.dumps(meta).encode())


def _head_mismatch(model: HeadModel, saved: dict[str, Any]) -> str | None:
    """What keeps ``saved`` (a :meth:`OrgState.load_head` document) from fitting ``model``, or None."""
    import torch

    want = {k: tuple(v.shape) for k, v in model.head_state_dict().items()}
    got = {k: tuple(getattr(v, "shape", ())) for k, v in saved["head"].items()}
    problems = []
    if missing := sorted(want.keys() - got.keys()):
        problems.append(f"missing {missing}")
    if unexpected := sorted(got.keys() - want.keys()):
        problems.append(f"unexpected {unexpected}")
    problems += [f"{k}: saved {got[k]}, model {want[k]}" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
    opt = saved.get("optimizer")
    if not problems and opt:
        params = model.head_parameters()
        try:
            ids = [i for g in opt["param_groups"] for i in g["params"]]
            state = opt.get("state", {})
        except (KeyError, TypeError, AttributeError):
            return "its optimizer state is not a torch optimizer state"
        if len(ids) != len(params):
            return f"its optimizer state is for {len(ids)} parameters, the head has {len(params)}"
        for i, param in zip(ids, params):
            for name, v in (state.get(i) or {}).items():
                if isinstance(v, torch.Tensor) and v.ndim > 0 and tuple(v.shape) != tuple(param.shape):
                    return f"its optimizer state {name!r} has shape {tuple(v.shape)}, the parameter {tuple(param.shape)}"
    return "; ".join(problems) or None
