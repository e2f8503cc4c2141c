"""Nothing private is lost or silently reset: persistence faults played as attacks.

Each test corrupts, swaps or poisons what a party keeps on disk (or reports) and checks
that the fault is refused or repaired loudly, never turned into a silent restart, a crash
at start-up, a state that stays broken, or a secret readable by other users.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_config
from fedembed.recipe import TrainConfig
from fedembed.config import ConfigError
from fedembed.coordinator import Coordinator
from fedembed.report import RunLog
from fedembed.store import file_sha256
from fedembed.task import TaskSpec

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})
ORG_1 = {"shop-1", "org-1"}  # organisation 1 (node 101): its task name, or its roster name where replies are signed


def _checkpoints(state: Path) -> list[Path]:
    return sorted(state.glob("checkpoint-*.npz"))


def _two_rounds(tmp_path: Path, direct_transport) -> tuple[Path, object]:
    """A finished 2-round run with its checkpoints in ``tmp_path / "coord"``."""
    t = direct_transport(tmp_path, 3, task=TASK)
    Coordinator(run_config(TASK, rounds=2), t, state_dir=tmp_path / "coord").run()
    assert [p.name for p in _checkpoints(tmp_path / "coord")] == ["checkpoint-000001.npz", "checkpoint-000002.npz"]
    return tmp_path / "coord", t


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity (what any other JSON reader does)."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ 1. every checkpoint corrupt


def test_all_checkpoints_corrupt_refuses_to_start_instead_of_silent_restart(tmp_path, direct_transport, caplog):
    state, t = _two_rounds(tmp_path, direct_transport)
    for p in _checkpoints(state):
        _flip_a_byte(p)
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(ConfigError) as err:
        Coordinator(run_config(TASK, rounds=4), t, state_dir=state)
    msg = str(err.value)
    assert "checkpoint-000001.npz" in msg and "checkpoint-000002.npz" in msg  # what was found
    assert "SHA-256" in msg
    assert "--state-dir" in msg and "restore" in msg  # what to do
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before  # nothing touched, nothing deleted


def test_a_corrupt_newest_checkpoint_still_resumes_from_the_previous_with_a_warning(tmp_path, direct_transport, caplog):
    state, t = _two_rounds(tmp_path, direct_transport)
    _flip_a_byte(_checkpoints(state)[-1])
    with caplog.at_level(logging.WARNING):
        c = Coordinator(run_config(TASK, rounds=4), t, state_dir=state)
    assert c.start_round == 2 and c.tables.version == 1
    assert any("checkpoint-000002.npz" in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path, direct_transport):
    (tmp_path / "coord").mkdir()
    c = Coordinator(run_config(TASK, rounds=2), direct_transport(tmp_path, 3, task=TASK), state_dir=tmp_path / "coord")
    assert c.start_round == 1 and c.tables.version == 0


def test_all_checkpoints_corrupt_server_command_refuses_and_exits_non_zero(tmp_path, direct_transport, caplog, monkeypatch):
    """``fedembed server`` on such a state dir says why and exits 2 before starting anything."""
    import fedembed.deploy.server as deploy_server
    from fedembed.cli import main

    state, _ = _two_rounds(tmp_path / "run", direct_transport)
    for p in _checkpoints(state):
        p.write_bytes(b"")  # truncated to nothing, digest kept
    server_dir = tmp_path / "server"
    (server_dir / "coordinator").parent.mkdir(parents=True)
    state.rename(server_dir / "coordinator")

    def no_superlink(*args, **kwargs):
        raise AssertionError("a SuperLink was started on a state dir whose checkpoints are all corrupt")

    monkeypatch.setattr(deploy_server, "CoordinatorProcess", no_superlink)  # where run_server looks it up
    from fedembed.identity import make_identities

    roster = make_identities(["org-0", "org-1", "org-2"], tmp_path / "keys").write(tmp_path / "roster.json")
    spec = run_config(TASK).federation.write(tmp_path / "federation.json")
    with caplog.at_level(logging.ERROR):
        rc = main(["server", "--federation", str(spec), "--rounds", "4", "--insecure", "--roster", str(roster),
                   "--state-dir", str(server_dir), "--quiet"])
    assert rc == 2
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("checkpoint-000002.npz" in m and "--state-dir" in m for m in errors), errors
    assert not (server_dir / "superlink.log").exists()


# ------------------------------------------------------------------ 2. unreadable checkpoint with a matching digest


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(5))
    return buf.getvalue()


def _zip_without_meta() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.arange(3))
    return buf.getvalue()


def _zip_with_bad_meta() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(b'["not", "a", "dict"]', dtype=np.uint8))
    return buf.getvalue()


def _truncated_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("meta.npy", b"x" * 100)
    return buf.getvalue()[:40]


NOT_A_CHECKPOINT = {
    "empty": b"",
    "text": b"hello, this is not a zip archive\n",
    "npy": _npy_bytes(),
    "truncated zip": _truncated_zip(),
    "zip without meta": _zip_without_meta(),
    "zip with bad meta": _zip_with_bad_meta(),
}


@pytest.mark.parametrize("kind", list(NOT_A_CHECKPOINT))
def test_non_zip_checkpoint_with_matching_sha256_does_not_crash_startup(tmp_path, direct_transport, kind):
    state, t = _two_rounds(tmp_path, direct_transport)
    newest, oldest = _checkpoints(state)[-1], _checkpoints(state)[0]
    for p in (newest,):
        p.write_bytes(NOT_A_CHECKPOINT[kind])
        p.with_suffix(".sha256").write_text(file_sha256(p))  # the digest matches: only the content is wrong
    c = Coordinator(run_config(TASK, rounds=4), t, state_dir=state)  # no traceback
    assert c.start_round == 2  # treated as corrupt: the previous checkpoint is used
    oldest.write_bytes(NOT_A_CHECKPOINT[kind])
    oldest.with_suffix(".sha256").write_text(file_sha256(oldest))
    with pytest.raises(ConfigError, match="none of them is usable"):  # every one unreadable: refused (fault 1)
        Coordinator(run_config(TASK, rounds=4), t, state_dir=state)


# ------------------------------------------------------------------ 3. corrupt org table cache


@pytest.mark.parametrize("part", ["sync file", "base file"])
def test_corrupt_table_cache_is_rebuilt_and_stays_repaired(tmp_path, direct_transport, part):
    task = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 60000})
    t = direct_transport(tmp_path, 3, task=task)
    cfg = run_config(task, rounds=8)
    c = Coordinator(cfg, t)
    nodes = sorted(t.orgs)
    for r in (1, 2):
        c.run_round(r, nodes)
    org_dir = t.orgs[101].state.dir
    deltas = sorted(org_dir.glob("tables.delta-*.npz"))
    assert deltas, "the cache should hold a base plus row syncs by now"
    _flip_a_byte(deltas[0] if part == "sync file" else org_dir / "tables.npz")
    stale = []
    for r in range(3, 9):
        entry = c.run_round(r, nodes)
        assert set(entry["rejected"]) <= ORG_1
        if entry["rejected"]:
            assert all("stale" in why for why in entry["rejected"].values())
            stale.append(r)
    assert stale == [3]  # one resync, then repaired for good (not stale every other round)
    c.closing_evaluation(nodes)
    cache, version = t.orgs[101].state.load_tables(c.shapes, cfg.seed, cfg.table_scale, cfg.run_key())
    # current on every row it holds fresh, which is every row its data looks up (its working set is all it syncs)
    from fedembed.workingset import RowState, working_set

    fresh = RowState.load(t.orgs[101].state.dir, c.shapes, version, cfg.run_key()).fresh_mask("products")
    assert fresh[working_set(t.orgs[101].task, c.shapes)["products"]].all()
    assert version == 8 and np.array_equal(cache["products"][fresh], c.tables.tables["products"][fresh])


# ------------------------------------------------------------------ 4. head.pt of another model


def _foreign_head(kind: str) -> dict:
    from examples.my_task import Net

    from fedembed.model import SplitModel

    if kind == "other shapes":
        other = SplitModel(Net(400, dim=8), tables=["products"])
        head = other.head_state_dict()
        opt = torch.optim.AdamW(other.head_parameters()).state_dict()
    else:  # other keys
        head = {"encoder.weight": torch.zeros(3, 3), "encoder.bias": torch.zeros(3)}
        opt = {}
    return {"head": head, "optimizer": opt, "round": 7}


@pytest.mark.parametrize("kind", ["other shapes", "other keys"])
def test_head_of_another_model_is_reported_and_set_aside(tmp_path, direct_transport, caplog, kind):
    t = direct_transport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=4), t)
    nodes = sorted(t.orgs)
    c.run_round(1, nodes)
    head = t.orgs[101].state.dir / "head.pt"
    torch.save(_foreign_head(kind), head)
    foreign = head.read_bytes()
    with caplog.at_level(logging.ERROR):
        entries = [c.run_round(r, nodes) for r in (2, 3, 4)]
    assert all(e["rejected"] == {} for e in entries)  # the organisation is not failed, round after round
    aside = list(head.parent.glob("head.pt.unusable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == foreign  # kept, not deleted
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # reported once, then the fresh head is used
    assert "head.pt" in errors[0] and aside[0].name in errors[0] and "fresh head" in errors[0]
    assert ("encoder.weight" if kind == "other keys" else "saved (32, 8)") in errors[0]  # names the mismatch
    assert torch.load(head, weights_only=True)["round"] == 4  # the fresh head trained on


def test_unreadable_head_is_set_aside_not_silently_overwritten(tmp_path, caplog):
    from fedembed.store import OrgState

    state = OrgState(tmp_path / "org")
    (state.dir / "head.pt").write_bytes(b"not a torch file")
    with caplog.at_level(logging.ERROR):
        assert state.load_head() is None
    aside = list(state.dir.glob("head.pt.unusable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"not a torch file"
    assert any(aside[0].name in r.message for r in caplog.records)


# ------------------------------------------------------------------ 5. NaN / inf metrics


def test_nan_metrics_keep_metrics_json_valid(tmp_path, caplog):
    log = RunLog(config={"mode": "fedembed"})
    log.set_metrics(0, "a", {"score": float("nan"), "loss": 1.0})
    log.new_round(1)
    log.set_metrics(1, "a", {"score": float("nan"), "loss": float("inf")})
    log.set_metrics(1, "b", {"score": 0.5, "loss": float("-inf")})
    log.set_metrics(1, "c", {"score": np.float32("nan"), "loss": np.float64(2.0)})
    log.rounds[0]["wall_seconds"] = float("inf")  # whatever else slips in is not written as Infinity either
    with caplog.at_level(logging.WARNING):
        log.write(tmp_path, None)
    doc = _strict_json((tmp_path / "metrics.json").read_text())
    assert doc["rounds"][0]["metrics"] == {"a": {}, "b": {"score": 0.5}, "c": {"loss": 2.0}}
    assert doc["initial"] == {"a": {"loss": 1.0}}
    assert doc["final"]["mean"] == {"loss": 2.0, "score": 0.5}
    assert all(math.isfinite(v) for v in log.final()["mean"].values())
    assert doc["rounds"][0]["wall_seconds"] is None
    assert any("'a'" in r.message and "score" in r.message for r in caplog.records)


def test_nan_metrics_from_an_org_keep_metrics_json_valid(tmp_path, direct_transport):
    """Through the coordinator: an organisation reports NaN / inf metrics every round."""
    def poison(node, content):
        if node == 101 and "metrics" in content:
            for k in list(content["metrics"]):
                content["metrics"][k] = float("nan") if k.startswith("val") else float("inf")
        return content

    c = Coordinator(run_config(TASK, rounds=2), direct_transport(tmp_path, 3, task=TASK, tamper=poison))
    c.run()
    c.log.write(tmp_path / "out", c.tables.tables)
    doc = _strict_json((tmp_path / "out" / "metrics.json").read_text())
    assert doc["final"]["mean"] and all(math.isfinite(v) for v in doc["final"]["mean"].values())
    assert all(not m for r in doc["rounds"] for org, m in r["metrics"].items() if org in ORG_1)


# ------------------------------------------------------------------ 6. secrets 0600 from creation


@pytest.fixture
def open_umask(monkeypatch):
    """umask 0 (a file gets exactly the mode it is created with) and no chmod anywhere."""
    old = os.umask(0)

    def no_chmod(*args, **kwargs):
        raise AssertionError("a file was chmod'ed after creation")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    yield
    os.umask(old)


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_secret_files_are_0600_from_creation(tmp_path, direct_transport, open_umask, monkeypatch):
    created: dict[str, int] = {}
    real_replace = os.replace

    def watching_replace(src, dst, *args, **kwargs):  # the mode every atomic write had when it landed
        created[str(dst)] = stat.S_IMODE(os.stat(src).st_mode)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", watching_replace)
    synthetic = TaskSpec("synthetic", {"orgs": 3, "seed": 0, "rows": 3000, "dim": 4})
    cfg = run_config(synthetic, rounds=2, secure=True, row_set="union", train=TrainConfig(guard=True))
    t = direct_transport(tmp_path / "orgs", 3, task=synthetic)
    c = Coordinator(cfg, t, state_dir=tmp_path / "coord")
    c.run()
    c.log.write(tmp_path / "coord", c.tables.tables)

    kinds = {"head.pt", "tables.npz", "tables.json", "session.json", "update.npz", "checkpoint", "guard"}
    seen = {k for k in kinds if any(k in p for p in created)}
    assert seen == kinds, f"the run did not write {kinds - seen}"
    wide = {p: oct(m) for p, m in created.items() if m & 0o077}
    assert not wide, f"written readable by others: {wide}"
    for d in [tmp_path / "coord", *(o.state.dir for o in t.orgs.values())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for p in d.rglob("*"):
            if p.is_file() and p.stat().st_size:  # an empty lock file holds nothing
                assert _private(p), p


def test_org_private_keys_from_certs_are_0600_from_creation(tmp_path, open_umask):
    from fedembed.cli import main

    assert main(["certs", str(tmp_path / "certs"), "--orgs", "2"]) == 0
    d = tmp_path / "certs"
    for name in ("ca.key", "server.key", "org-0.key", "org-1.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "server.crt", "org-0.pub"):  # public halves stay readable
        assert stat.S_IMODE((d / name).stat().st_mode) & 0o044 == 0o044, name


# ------------------------------------------------------------------ 7. a recipe that changed under a resumed run


def _recipe_warnings(caplog) -> list[str]:
    return [r.message for r in caplog.records
            if r.levelno == logging.WARNING and "differs from the checkpoint's" in r.message]


def test_resuming_with_another_recipe_says_which_fields_changed(tmp_path, direct_transport, caplog):
    """A flag changed on resume changes the recipe mid-run: allowed, and said field by field."""
    state, t = _two_rounds(tmp_path, direct_transport)
    with caplog.at_level(logging.WARNING):
        Coordinator(run_config(TASK, rounds=4), t, state_dir=state)
    assert _recipe_warnings(caplog) == []  # the control: the same recipe resumes silently
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        c = Coordinator(run_config(TASK, rounds=4, train=TrainConfig(table_lr=0.02, epochs=2)), t, state_dir=state)
    assert c.start_round == 3
    (msg,) = _recipe_warnings(caplog)
    assert "table_lr 0.05 -> 0.02" in msg and "epochs 1 -> 2" in msg and str(state) in msg
    assert "head_lr" not in msg  # only what changed
    # `fedembed server` shows them too: the warning above is in the ServerApp's process, whose log the user does not
    # see; the start event of progress.jsonl carries the changes to the command's own output
    from fedembed.apps.runfiles import DeployedRunFiles
    from fedembed.cli import _DeployProgress

    files = DeployedRunFiles(tmp_path / "deployed")
    files.on_start(c)
    event = json.loads(files.progress.read_text().splitlines()[-1])
    assert event["recipe_changes"] == ["epochs 1 -> 2", "table_lr 0.05 -> 0.02"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _DeployProgress(rounds=4, enabled=False)(event)
    assert [r.message for r in caplog.records if "table_lr 0.05 -> 0.02" in r.message]


def test_resuming_a_checkpoint_from_before_the_pooled_normaliser_default_says_so(tmp_path, direct_transport, caplog):
    """A checkpoint written before ``pooled_normaliser_rows`` existed ran without it; resuming
    with the default (a 400-row table now carries it) is said, with the flag that keeps the old way."""
    from fedembed.store import load_checkpoint, save_checkpoint

    state, t = _two_rounds(tmp_path, direct_transport)
    ckpt = load_checkpoint(_checkpoints(state)[-1])
    del ckpt.config["run"]["train"]["pooled_normaliser_rows"]  # as an older fedembed wrote it
    old = tmp_path / "old"
    old.mkdir(mode=0o700)
    save_checkpoint(old, ckpt)
    with caplog.at_level(logging.WARNING):
        c = Coordinator(run_config(TASK, rounds=4), t, state_dir=old)
    assert c.start_round == 3 and c.pooled == {"products"}
    (msg,) = _recipe_warnings(caplog)
    assert "pooled_normaliser_rows absent from the checkpoint" in msg and "--pooled-normaliser-rows 0" in msg
    assert msg.endswith("-> 1000; from the next round on the new values apply (pass the old ones to keep them)")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # resumed the old way: nothing changes, nothing to say
        c = Coordinator(run_config(TASK, rounds=4, train=TrainConfig(pooled_normaliser_rows=0)), t, state_dir=old)
    assert _recipe_warnings(caplog) == [] and c.pooled == frozenset()


def test_resuming_a_checkpoint_from_before_the_half_step_of_small_tables_says_so(tmp_path, direct_transport, caplog):
    """An older fedembed stepped every table by ``server_lr``; a checkpoint it wrote lacks
    ``pooled_server_lr``, and resuming with the default (its 400-row table moves by half its sum)
    is said, with the flag that keeps the old step: the checkpoint's own ``server_lr``."""
    from fedembed.store import load_checkpoint, save_checkpoint

    state, t = _two_rounds(tmp_path, direct_transport)
    ckpt = load_checkpoint(_checkpoints(state)[-1])
    del ckpt.config["run"]["pooled_server_lr"]  # as an older fedembed wrote it
    for server_lr in (1.0, 0.7):
        ckpt.config["run"]["server_lr"] = server_lr
        old = tmp_path / f"old-{server_lr}"
        old.mkdir(mode=0o700)
        save_checkpoint(old, ckpt)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            c = Coordinator(run_config(TASK, rounds=4, server_lr=server_lr), t, state_dir=old)
        assert c.start_round == 3 and c.optimizer.table_lr == {"products": 0.5}
        (msg,) = _recipe_warnings(caplog)
        assert (f"pooled_server_lr absent from the checkpoint (written by an older fedembed, which ran as {server_lr!r}; "
                f"--pooled-server-lr {server_lr:g} keeps that) -> 0.5") in msg
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # resumed the old way: nothing changes, nothing to say
            c = Coordinator(run_config(TASK, rounds=4, server_lr=server_lr, pooled_server_lr=server_lr), t, state_dir=old)
        assert _recipe_warnings(caplog) == [] and c.optimizer.table_lr == {"products": server_lr}
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the coordinator's own step is part of the recipe it names
        Coordinator(run_config(TASK, rounds=4, server_lr=0.8), t, state_dir=state)
    (msg,) = _recipe_warnings(caplog)
    assert "server_lr 1.0 -> 0.8" in msg and "pooled_server_lr" not in msg
