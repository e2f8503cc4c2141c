"""Atomic checkpoints and organisation state."""

import numpy as np
import torch

from fedembed.store import Checkpoint, OrgState, load_latest_checkpoint, save_checkpoint
from fedembed.tables import VersionedTables


def ckpt(round_):
    vt = VersionedTables.initial({"t": (5, 2)}, seed=round_, scale=0.1)
    vt.version = round_
    return Checkpoint(vt, {"t": np.full(5, float(round_), np.float32)}, {"round": round_})


def test_latest_checkpoint_round_trips(tmp_path):
    save_checkpoint(tmp_path, ckpt(1))
    save_checkpoint(tmp_path, ckpt(2))
    got = load_latest_checkpoint(tmp_path)
    assert got.round == 2
    assert np.array_equal(got.tables.tables["t"], ckpt(2).tables.tables["t"])
    assert got.optimizer_state["t"][0] == 2.0


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    save_checkpoint(tmp_path, ckpt(1))
    p = save_checkpoint(tmp_path, ckpt(2))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert load_latest_checkpoint(tmp_path).round == 1


def test_partial_checkpoint_without_digest_is_skipped(tmp_path):
    save_checkpoint(tmp_path, ckpt(1))
    p = save_checkpoint(tmp_path, ckpt(2))
    p.with_suffix(".sha256").unlink()
    assert load_latest_checkpoint(tmp_path).round == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, ckpt(r), keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["checkpoint-000004.npz", "checkpoint-000005.npz"]


def test_org_table_cache_of_another_run_is_not_reused(tmp_path):
    st = OrgState(tmp_path)
    t = {"t": np.ones((4, 2), np.float32)}
    st.save_tables(t, 3, key="run-a")
    got, v = st.load_tables({"t": (4, 2)}, seed=0, scale=0.1, key="run-a")
    assert v == 3 and np.array_equal(got["t"], t["t"])
    got, v = st.load_tables({"t": (4, 2)}, seed=0, scale=0.1, key="run-b")
    assert v == 0 and not np.array_equal(got["t"], t["t"])


def test_org_head_survives_a_restart(tmp_path):
    OrgState(tmp_path).save_head({"w": torch.ones(2)}, {"state": {}, "param_groups": []}, 4)
    saved = OrgState(tmp_path).load_head()
    assert saved["round"] == 4 and torch.equal(saved["head"]["w"], torch.ones(2))
