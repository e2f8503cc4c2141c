"""The baselines run in one process, outside the federation's privacy path, and train what they are named after."""

import numpy as np
import pytest
import torch

from conftest import run_config
from fedembed.baselines import run_baseline
from fedembed.baselines.fedavg_all import average_heads
from fedembed.config import ConfigError
from fedembed.coordinator import Coordinator
from fedembed.tables import init_table
from fedembed.task import TaskSpec, load_task
from fedembed.train import build_seeded

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})
NAMES = ["org-0", "org-1", "org-2"]


def _tasks(spec=TASK, n=3):
    return [load_task(spec.for_org(i, n)) for i in range(n)]


def test_a_coordinator_refuses_to_run_a_baseline(tmp_path, direct_transport):
    for mode in ("local", "fedavg-all", "pooled"):
        with pytest.raises(ConfigError, match="baseline that runs in one process"):
            Coordinator(run_config(TASK, rounds=1, mode=mode), direct_transport(tmp_path / mode, 3, task=TASK))


def test_local_never_shares_a_row_and_repeats_exactly():
    cfg = run_config(TASK, rounds=2, mode="local")
    log1, tables = run_baseline(cfg, _tasks(), NAMES)
    log2, _ = run_baseline(cfg, _tasks(), NAMES)
    assert tables is None  # nothing shared, nothing to write
    assert log1.to_dict()["final"] == log2.to_dict()["final"]  # seeded from --seed and the names
    assert set(log1.initial) == set(NAMES) and all(r["clients"] == 3 for r in log1.rounds)
    # organisations alone differ from each other; the run's seed changes what each gets
    other, _ = run_baseline(run_config(TASK, rounds=2, mode="local", seed=1), _tasks(), NAMES)
    assert other.to_dict()["final"] != log1.to_dict()["final"]


def test_fedavg_all_ends_with_one_head_and_the_federations_tables():
    cfg = run_config(TASK, rounds=2, mode="fedavg-all")
    tasks = _tasks()
    runlog, tables = run_baseline(cfg, tasks, NAMES)
    assert tables["products"].shape == (400, 16)
    start = init_table("products", (400, 16), cfg.seed, cfg.table_scale)
    assert np.abs(tables["products"] - start).sum(1).nonzero()[0].size > 0  # the averaged rows moved
    final = runlog.to_dict()["final"]
    assert set(final) == set(NAMES) | {"mean"} and all(np.isfinite(m["score"]) for m in final.values())


def test_average_heads_weights_by_examples():
    a = {"w": np.zeros(3, np.float32)}
    b = {"w": np.full(3, 4.0, np.float32)}
    np.testing.assert_allclose(average_heads([(a, 1.0), (b, 3.0)])["w"], 3.0)
    np.testing.assert_allclose(average_heads([(a, 0.0), (b, 0.0)])["w"], 2.0)  # no examples: equal weights


def test_fedavg_all_refuses_heads_that_differ_naming_each_organisation():
    # movies "mixed": organisations predict different targets, so their heads differ in shape
    mixed = TaskSpec("movies", {"orgs": 3, "scenario": "mixed", "dim": 8})
    tasks = _tasks(mixed)
    names = ["United States", "France", "United Kingdom"]
    with pytest.raises(ConfigError, match="heads differ from United States's") as err:
        run_baseline(run_config(mixed, rounds=1, mode="fedavg-all"), tasks, names)
    assert "France" in str(err.value) and "United Kingdom" in str(err.value)


def test_build_seeded_gives_the_same_head_for_the_same_seed_and_name_only():
    task = _tasks()[0]
    h = lambda seed, who: build_seeded(task, seed, who).head_state_dict()  # noqa: E731
    a, b, c, d = h(0, "org-0"), h(0, "org-0"), h(1, "org-0"), h(0, "org-1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)
