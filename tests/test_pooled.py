"""The pooled baseline: one table for everyone; one head, or one per organisation when heads differ."""

import numpy as np

from fedembed.config import RunConfig
from fedembed.pooled import run_pooled
from fedembed.task import TaskSpec


def test_pooled_with_different_heads_trains_one_table_and_a_head_per_organisation():
    cfg = RunConfig(task=TaskSpec("movies", {"orgs": 3, "seed": 0, "scenario": "mixed"}), rounds=1, mode="pooled")
    runlog, tables = run_pooled(cfg)  # used to hand the tied sparse table to the heads' dense Adam
    final = runlog.to_dict()["final"]
    assert set(final) == {"United States", "France", "United Kingdom", "mean"}
    assert all(np.isfinite(m["score"]) for m in final.values())
    assert tables["ids"].shape[1] == 32
