"""Export: an organisation's trained model, and the coordinator's final tables, as plain files.

:func:`export_organisation` gives an organisation what it serves: the state dict of its
own plain ``nn.Module`` (the one it wrapped in :class:`fedembed.SplitModel`) holding the
final shared tables from its table cache and its private head, so that
``module.load_state_dict(torch.load(path))`` restores it with no fedembed at serving
time. A private residual (``--residual``) is folded into the table it corrects, so the
state dict still fits the plain module. :func:`export_coordinator` writes the
coordinator's final tables and, where a table is keyed by a vocabulary, that vocabulary
file (checked against the digest the federation published).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedembed.errors import FedembedError
from fedembed.spec import FederationSpec, vocabulary_files
from fedembed.store import OrgState, atomic_write, atomic_write_npz, load_latest_checkpoint
from fedembed.task import TaskSpec, load_task, resolve_device

log = logging.getLogger(__name__)


class ExportError(FedembedError, ValueError):
    """Nothing to export, or the state does not fit the task."""


def _warn_unsynced_rows(state: OrgState, shapes: dict[str, tuple[int, int]], version: int) -> None:
    """Say how many cached rows are older than the tables (an organisation that synced its working set only)."""
    from fedembed.workingset import RowState

    key = state.cache_key()
    if key is None:
        return
    rows = RowState.load(state.dir, shapes, version, str(key))
    old = {n: int((~rows.fresh_mask(n)).sum()) for n in shapes}
    if any(old.values()):
        log.warning(
            "%s: rows outside what this organisation asked to be synced (sync=padded or working-set) may hold "
            "older values (those another organisation changed since it last synced them): %s not synced; every "
            "row its data looks up is current. Run its last round with --sync full for a whole current table.",
            state.dir, ", ".join(f"{n}: {k} of {shapes[n][0]}" for n, k in old.items()),
        )


def organisation_model(state_dir: Path, spec: TaskSpec, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The organisation's trained plain module (final cached tables + its head) and a description of it.

    Raises
    ------
    ExportError
        No trained tables or head in ``state_dir``, or a head of another model.
    """
    task = load_task(spec)
    task.device = resolve_device(device)
    state = OrgState(Path(state_dir))
    shapes = {n: t.shape for n, t in task.table_specs().items()}
    tables, version = state.load_cached_tables(shapes)
    if version == 0:
        raise ExportError(f"{state_dir} holds no trained tables (has this organisation taken part in a round?)")
    _warn_unsynced_rows(state, shapes, version)
    model = task.build_model()
    path = state.dir / "head.pt"
    try:  # read here, not through OrgState.load_head: an export never moves the organisation's live head aside
        saved = torch.load(path, map_location="cpu", weights_only=True)
        head = saved["head"]
    except (OSError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ExportError(f"{path}: no usable head for this task's model ({exc})") from exc
    table_keys = set(model.module.state_dict()) - set(model.head_state_dict())
    suffix = ".residual.weight"
    if any(k.endswith(suffix) and k[: -len(suffix)] + ".weight" in table_keys for k in head):
        model.add_residuals()  # the organisation trained a private residual on its tables
    model.set_tables(tables)
    try:
        model.load_head_state_dict(head)
    except ValueError as exc:
        raise ExportError(f"{path} does not fit this task's model: {exc}") from exc
    sd = model.module.state_dict()
    plain: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(suffix) and key[: -len(suffix)] + ".shared.weight" in sd:
            continue  # a table's private residual: folded into the table below
        if key.endswith(".shared.weight"):  # shared + private residual: one table, the same lookups
            base = key[: -len(".shared.weight")]
            plain[base + ".weight"] = value + sd[base + ".residual.weight"]
        else:
            plain[key] = value
    plain_model = task.build_model().module
    plain_model.load_state_dict(plain)
    info = {
        "tables_version": version,
        "head_round": int(saved.get("round", 0)),
        "tables": {n: t.to_dict() for n, t in task.table_specs().items()},
        "task": {"name": spec.name, "options": spec.options, "data": spec.data},
    }
    return plain_model.to(task.device), info


def export_organisation(state_dir: Path, spec: TaskSpec, out: Path, device: str = "cpu", best: bool = False) -> list[Path]:
    """Write ``out`` (the plain module's state dict) and ``out`` + ``.json`` (what it is); returns the paths.

    With ``best``, the state the organisation served (its best-validation evaluation), kept in
    ``state_dir/best`` (:class:`fedembed.serving.BestValidation`), instead of its last.

    Raises
    ------
    ExportError
        As :func:`organisation_model`; with ``best``, no served state kept there.
    """
    if best:
        kept = Path(state_dir) / "best"
        if not (kept / "head.pt").is_file() or not (kept / "tables.npz").is_file():
            raise ExportError(f"{kept} holds no served state: keep one with `fedembed client --keep-best-state` "
                              "(or the run's --keep-best-state); without it, export gives the last state")
        if OrgState(kept).cache_key() != OrgState(Path(state_dir)).cache_key():  # kept by an earlier run here
            raise ExportError(f"{kept} holds the served state of another run than the organisation's last one; "
                              "export without --best, or run with --keep-best-state")
        state_dir = kept
    model, info = organisation_model(state_dir, spec, device)
    info["state"] = "served (best validation)" if best else "last"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(out, buf.getvalue(), mode=0o600)
    meta = out.with_name(out.name + ".json")
    atomic_write(meta, (json.dumps(info, indent=2) + "\n").encode(), mode=0o600)
    return [out, meta]


def export_coordinator(
    state_dir: Path, out: Path, federation: FederationSpec | None = None, spec_path: Path | None = None
) -> list[Path]:
    """Write the coordinator's final tables to ``out`` (.npz) and each table's vocabulary beside it.

    Parameters
    ----------
    state_dir : Path
        The coordinator's state directory (``fedembed server --state-dir``) or a simulation's output.
    out : Path
        The ``.npz`` to write (one array per table).
    federation, spec_path : optional
        The federation spec and its file: vocabulary files it names are copied as
        ``<out stem>.<table>.vocab.txt`` after checking their digest.

    Raises
    ------
    ExportError
        No checkpoint, or a vocabulary file whose digest is not the federation's.
    """
    from fedembed.vocab import Vocabulary

    state_dir = Path(state_dir)
    for ckpt_dir in (state_dir / "coordinator", state_dir / "state" / "coordinator", state_dir):
        if ckpt_dir.is_dir() and (ckpt := load_latest_checkpoint(ckpt_dir)) is not None:
            break
    else:
        raise ExportError(f"no coordinator checkpoint under {state_dir}")
    run = ckpt.config.get("run") if isinstance(ckpt.config, dict) else None
    if federation is not None and (not isinstance(run, dict) or run.get("federation") != federation.to_dict()):
        raise ExportError(f"the checkpoint under {state_dir} is not a run of this federation spec ({spec_path})")
    vocabs = {}
    if federation is not None and spec_path is not None:  # every vocabulary checked before anything is written
        for name, path in vocabulary_files(Path(spec_path)).items():
            vocab = Vocabulary.load(path)
            if vocab.digest != federation.tables[name].vocabulary:
                raise ExportError(f"{path}: digest {vocab.digest} is not table {name!r}'s in the federation spec")
            vocabs[name] = path
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(out, {n: np.asarray(t) for n, t in ckpt.tables.tables.items()}, mode=0o644)
    written = [out]
    for name, path in vocabs.items():
        dest = out.with_name(f"{out.stem}.{name}.vocab.txt")
        shutil.copyfile(path, dest)
        written.append(dest)
    log.info("exported the tables of round %d", ckpt.round)
    return written
