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


def test_org_table_cache_writes_only_synced_rows_and_reads_back_exactly(tmp_path):
    from fedembed.tables import RowSync, apply_sync, init_table

    state = OrgState(tmp_path / "org")
    shapes = {"t": (1000, 4)}
    tables = {"t": init_table("t", shapes["t"], 0, 0.1)}
    state.save_tables(tables, 0, "run")
    base = (tmp_path / "org" / "tables.npz").stat().st_mtime_ns
    rng = np.random.default_rng(0)
    for version in (1, 2, 3):
        ids = np.sort(rng.choice(1000, size=50, replace=False))
        sync = {"t": RowSync(ids, rng.normal(size=(50, 4)).astype(np.float32))}
        apply_sync(tables, sync)
        state.save_sync(tables, sync, version, "run")
    assert (tmp_path / "org" / "tables.npz").stat().st_mtime_ns == base  # base untouched
    assert len(list((tmp_path / "org").glob("tables.delta-*.npz"))) == 3
    loaded, version = state.load_tables(shapes, 0, 0.1, "run")
    assert version == 3 and np.array_equal(loaded["t"], tables["t"])
    # past half the rows in syncs, the whole table becomes the new base again
    big = {"t": RowSync(np.arange(600), np.ones((600, 4), np.float32))}
    apply_sync(tables, big)
    state.save_sync(tables, big, 4, "run")
    assert not list((tmp_path / "org").glob("tables.delta-*.npz"))
    loaded, version = state.load_tables(shapes, 0, 0.1, "run")
    assert version == 4 and np.array_equal(loaded["t"], tables["t"])


def test_two_syncs_at_one_version_keep_the_cache(tmp_path):
    """Two syncs recorded at the same version (a row sent again) wrote one file name twice: the first entry's
    checksum then failed and the next load threw the whole cache away."""
    from fedembed.tables import RowSync, apply_sync, init_table

    state = OrgState(tmp_path / "org")
    shapes = {"t": (100, 2)}
    tables = {"t": init_table("t", shapes["t"], 0, 0.1)}
    state.save_tables(tables, 3, "run")
    for value in (1.0, 2.0):
        sync = {"t": RowSync(np.arange(5), np.full((5, 2), value, np.float32))}
        apply_sync(tables, sync)
        state.save_sync(tables, sync, 3, "run")
    loaded, version = state.load_tables(shapes, 0, 0.1, "run")
    assert version == 3 and np.array_equal(loaded["t"], tables["t"]) and loaded["t"][0, 0] == 2.0


def test_a_corrupt_sync_file_makes_the_cache_rebuild_instead_of_serving_wrong_rows(tmp_path):
    from fedembed.tables import RowSync, init_table

    state = OrgState(tmp_path / "org")
    shapes = {"t": (100, 2)}
    tables = {"t": init_table("t", shapes["t"], 0, 0.1)}
    state.save_tables(tables, 0, "run")
    sync = {"t": RowSync(np.arange(5), np.ones((5, 2), np.float32))}
    tables["t"][:5] = 1
    state.save_sync(tables, sync, 1, "run")
    delta = next((tmp_path / "org").glob("tables.delta-*.npz"))
    delta.write_bytes(delta.read_bytes()[:-10] + b"0123456789")
    loaded, version = state.load_tables(shapes, 0, 0.1, "run")
    assert version == 0  # rebuilt from the seed: the coordinator resyncs it
    assert np.array_equal(loaded["t"], init_table("t", shapes["t"], 0, 0.1))
