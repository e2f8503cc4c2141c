"""The pooled baseline: the federation's own architecture trained centrally (one table, each organisation its head)."""

import numpy as np

from conftest import run_config
from fedembed.baselines.pooled import run_pooled
from fedembed.task import TaskSpec, load_task, simulated_federation


def test_pooled_with_different_heads_trains_one_table_and_a_head_per_organisation():
    base = TaskSpec("movies", {"seed": 0, "scenario": "mixed"})
    specs, names, _ = simulated_federation(base, 3)
    cfg = run_config(TaskSpec("movies", {"orgs": 3, "seed": 0, "scenario": "mixed"}), rounds=1, mode="pooled")
    tasks = [load_task(s) for s in specs]
    runlog, tables = run_pooled(cfg, tasks, names)  # used to hand the tied sparse table to the heads' dense Adam
    final = runlog.to_dict()["final"]
    assert set(final) == {"United States", "France", "United Kingdom", "mean"}
    assert all(np.isfinite(m["score"]) for m in final.values())
    assert tables["ids"].shape[1] == 32
