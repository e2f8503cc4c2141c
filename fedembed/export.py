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

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedembed.errors import FedembedError
from fedembed.spec import FederationSpec
from fedembed.store import OrgState, atomic_write, atomic_write_npz, load_latest_checkpoint
from fedembed.task import TaskSpec, load_task, resolve_device

log = logging.getLogger(__name__)


class ExportError(FedembedError, ValueError):
    """Nothing to export, or the state does not fit the task."""


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
    model = task.build_model()
    head_keys = set(torch.load(state.dir / "head.pt", map_location="cpu", weights_only=True)["head"]) \
        if (state.dir / "head.pt").exists() else set()
    if any(".residual." in k for k in head_keys):
        model.add_residuals()
    model.set_tables(tables)
    saved = state.load_head(model)
    if saved is None:
        raise ExportError(f"{state_dir} holds no head for this task's model")
    model.load_head_state_dict(saved["head"])
    sd = model.module.state_dict()
    plain: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".residual." in key:
            continue
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


def export_organisation(state_dir: Path, spec: TaskSpec, out: Path, device: str = "cpu") -> list[Path]:
    """Write ``out`` (the plain module's state dict) and ``out`` + ``.json`` (what it is); returns the paths."""
    model, info = organisation_model(state_dir, spec, device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out)
    meta = out.with_name(out.name + ".json")
    atomic_write(meta, (json.dumps(info, indent=2) + "\n").encode(), mode=0o600)
    return [out, meta]


def _vocab_paths(spec_path: Path) -> dict[str, Path]:
    """Table -> vocabulary file named in a spec file (TOML or JSON), resolved against the file."""
    import tomllib

    raw = spec_path.read_bytes()
    doc = tomllib.loads(raw.decode()) if spec_path.suffix == ".toml" else json.loads(raw)
    out = {}
    for name, t in doc.get("tables", {}).items():
        v = t.get("vocabulary")
        if isinstance(v, str) and not v.startswith(("sha256:", "blake2b")):
            out[name] = Path(v) if Path(v).is_absolute() else spec_path.parent / v
    return out


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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(out, {n: np.asarray(t) for n, t in ckpt.tables.tables.items()}, mode=0o644)
    written = [out]
    if federation is not None and spec_path is not None:
        for name, path in _vocab_paths(Path(spec_path)).items():
            vocab = Vocabulary.load(path)
            if vocab.digest != federation.tables[name].vocabulary:
                raise ExportError(f"{path}: digest {vocab.digest} is not table {name!r}'s in the federation spec")
            dest = out.with_name(f"{out.stem}.{name}.vocab.txt")
            shutil.copyfile(path, dest)
            written.append(dest)
    log.info("exported the tables of round %d", ckpt.round)
    return written
