"""Secure aggregation inside a real Flower simulation (Ray), through `fedembed simulate`."""

import json

import numpy as np
import pytest

from fedembed.cli import main

pytestmark = pytest.mark.slow

# --seed: the run's (tables, sampling, shuffling); the task's own seed option: its data
TASK = ["--task", "synthetic", "--orgs", "3", "--option", "rows=20000", "--option", "dim=16", "--option", "seed=3",
        "--seed", "3", "--quiet"]


def _run(out, *extra):
    assert main(["simulate", *TASK, "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _table(out):
    with np.load(out / "embeddings.npz") as z:
        return z["ids"]


def test_secure_union_run_ends_with_the_plain_runs_table_within_the_documented_bound(tmp_path):
    plain = _run(tmp_path / "plain", "--rounds", "1")
    secure = _run(tmp_path / "secure", "--rounds", "1", "--secure", "--row-set", "union")
    r = secure["rounds"][0]
    assert r["clients"] == 3 and not r["rejected"]
    assert {"train", "share", "indicators", "unmask_indicators", "masked", "unmask"} <= set(r["stages"])
    assert all(r["stages"][s]["upload_bytes"] > 0 for s in ("train", "share", "indicators", "masked", "unmask"))
    assert r["upload_bytes"] < r["dense_upload_bytes"] / 10
    diff = np.abs(_table(tmp_path / "plain") - _table(tmp_path / "secure")).max()
    assert diff <= r["secure"]["error_bound"]
    assert plain["rounds"][0]["rows_changed"] == r["rows_changed"]


def test_secure_dense_run_completes_through_an_injected_dropout(tmp_path):
    """Without early unmask the dropout is recovered in its round; with it (the default) that round is lost, and
    the run goes on with sessions that recover dropouts: a second dropout is recovered."""
    doc = _run(tmp_path / "drop", "--rounds", "2", "--secure", "--row-set", "dense", "--drop", "masked@2:1",
               "--no-early-unmask")
    r1, r2 = doc["rounds"]
    assert r1["clients"] == 3 and r2["clients"] == 2
    assert "dropped at stage masked" in r2["rejected"]["org-1"]
    assert "abandoned" not in r2 and r2["rows_changed"] > 0
    assert set(doc["final"]) >= {"org-0", "org-1", "org-2", "mean"}
    doc = _run(tmp_path / "early", "--rounds", "6", "--secure", "--row-set", "dense", "--drop", "masked@2:1",
               "--drop", "masked@5:2")
    r = doc["rounds"]
    assert "org-1 shared but did not deliver" in r[1]["abandoned"] and r[1]["secure"]["early_unmask"]
    assert not r[2]["secure"]["set_up_ahead"] and "abandoned" not in r[2] and r[2]["clients"] == 3
    assert set(r[3]["stages"]) - {"aggregate"} == {"train", "unmask"} and "early_unmask" not in r[3]["secure"]
    assert "abandoned" not in r[4] and r[4]["clients"] == 2 and "dropped at stage masked" in r[4]["rejected"]["org-2"]
    assert set(doc["final"]) >= {"org-0", "org-1", "org-2", "mean"}
