"""The coordinator's rounds (no Flower process): sync, aggregation, refusing bad input."""

import numpy as np
import pytest
from flwr.app import Array

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.task import TaskSpec

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})


def run(tmp_path, transport, rounds=2, **kw):
    cfg = run_config(TASK, rounds=rounds, **kw)
    c = Coordinator(cfg, transport, state_dir=tmp_path / "coord")
    c.run()
    return c


def test_every_org_cache_equals_the_coordinators_tables_after_sync(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    c = run(tmp_path, t, rounds=3)
    # the closing evaluation synced every org to the final version
    for org in t.orgs.values():
        cache, version = org.state.load_tables(c.shapes, 0, 0.1, c.cfg.run_key())
        assert version == 3
        assert np.array_equal(cache["products"], c.tables.tables["products"])


def test_second_round_downloads_only_rows_changed_since_the_first(tmp_path, direct_transport):
    c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK), rounds=2)
    r1, r2 = c.log.rounds
    assert r1["download_bytes"] < 10_000  # version 0 is regenerated from the seed: no rows travel
    changed_r1 = int((c.tables.versions["products"] >= 1).sum())
    assert changed_r1 > 0
    assert r2["download_bytes"] >= 3 * changed_r1 * 16 * 4  # each org got the changed float32 rows
    assert all(r["upload_bytes"] < r["dense_upload_bytes"] for r in c.log.rounds)


def corrupt(kind):
    def tamper(node, content):
        if node != 101 or "update" not in content:
            return content
        rec = content["update"]
        ids = rec["products.ids"].numpy()
        delta = rec["products.delta"].numpy().copy()
        if kind == "nan":
            delta[0, 0] = np.nan
            rec["products.delta"] = Array(delta)
        elif kind == "range":
            ids = ids.copy(); ids[-1] = 10**6
            rec["products.ids"] = Array(ids)
        elif kind == "duplicate":
            ids = ids.copy(); ids[1] = ids[0]
            rec["products.ids"] = Array(ids)
        elif kind == "shape":
            rec["products.delta"] = Array(delta[:, :5])
        elif kind == "garbage":
            rec["products.weight"] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x00" * 7)
        return content
    return tamper


@pytest.mark.parametrize("kind, fault", [("nan", "NaN"), ("range", "out of range"), ("duplicate", "duplicated"),
                                         ("shape", "shape"), ("garbage", "cannot be decoded")])
def test_bad_update_is_refused_naming_the_org_and_the_round_goes_on(tmp_path, direct_transport, kind, fault, caplog):
    honest = run(tmp_path / "a", direct_transport(tmp_path / "a", 3, task=TASK), rounds=1)
    c = run(tmp_path / "b", direct_transport(tmp_path / "b", 3, task=TASK, tamper=corrupt(kind)), rounds=1)
    entry = c.log.rounds[0]
    assert list(entry["rejected"]) == ["org-1"]
    assert fault in entry["rejected"]["org-1"]
    assert entry["clients"] == 2
    assert any("org-1" in r.message and fault in r.message for r in caplog.records)
    assert np.all(np.isfinite(c.tables.tables["products"]))
    assert not np.array_equal(c.tables.tables["products"], honest.tables.tables["products"])  # went on without it
    assert c.log.final()["mean"]  # the closing evaluation still ran


def test_oversized_reply_is_refused(tmp_path, direct_transport):
    c = run(tmp_path, direct_transport(tmp_path, 3, task=TASK), rounds=1, max_message_bytes=1000)
    assert len(c.log.rounds[0]["rejected"]) == 3
    assert all("exceeds the limit" in v for v in c.log.rounds[0]["rejected"].values())


def test_lost_org_cache_is_detected_and_resynced(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    cfg = run_config(TASK, rounds=3)
    c = Coordinator(cfg, t)
    c.run_round(1, sorted(t.orgs))
    c.run_round(2, sorted(t.orgs))
    (t.orgs[102].state.dir / "tables.json").unlink()  # org 2 lost its cache
    entry = c.run_round(3, sorted(t.orgs))
    assert "stale" in entry["rejected"]["org-2"]
    assert c.known[102] == 0
    c.closing_evaluation(sorted(t.orgs))
    cache, v = t.orgs[102].state.load_tables(c.shapes, 0, 0.1, cfg.run_key())
    assert np.array_equal(cache["products"], c.tables.tables["products"])


def test_coordinator_resumes_from_its_checkpoint(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    run(tmp_path, t, rounds=2)
    c2 = Coordinator(run_config(TASK, rounds=4), t, state_dir=tmp_path / "coord")
    assert c2.start_round == 3 and c2.tables.version == 2 and len(c2.log.rounds) == 2
