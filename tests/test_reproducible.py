"""The same command twice gives the same scores and tables: the framework seeds everything it runs.

The task is examples/my_task.py, whose model is plain torch built with no seed of its own:
its heads repeat only because fedembed seeds torch from --seed and the organisation's name.
"""

import json

import numpy as np
import pytest

from conftest import run_config
from fedembed.cli import main
from fedembed.coordinator import Coordinator
from fedembed.task import TaskSpec

TASK = TaskSpec("examples/my_task.py:ClicksTask", {"orgs": 3, "products": 500})


def _scores(doc: dict) -> list:
    return [{org: m["score"] for org, m in r["metrics"].items()} for r in doc["rounds"]] + [doc["final"]]


def test_two_runs_of_the_coordinator_are_identical_and_another_seed_is_not(tmp_path, direct_transport):
    logs, tables = [], []
    for i, seed in enumerate((0, 0, 1)):
        c = Coordinator(run_config(TASK, rounds=2, seed=seed), direct_transport(tmp_path / str(i), 3, task=TASK))
        logs.append(c.run().to_dict())
        tables.append(c.tables.tables["products"].copy())
    assert _scores(logs[0]) == _scores(logs[1])
    assert np.array_equal(tables[0], tables[1])
    assert not np.array_equal(tables[0], tables[2])  # the control: --seed is what they repeat from


@pytest.mark.slow
def test_the_same_simulate_command_twice_and_its_secure_twin_give_identical_scores_and_tables(tmp_path):
    """The 500-row table carries the pooled normaliser by default; without it too, plain and secure runs agree."""
    base = ["simulate", "--task", "examples/my_task.py:ClicksTask", "--option", "products=500", "--orgs", "3",
            "--rounds", "2", "--quiet"]
    off = ["--pooled-normaliser-rows", "0"]
    runs = {"a": [], "b": [], "secure": ["--secure"], "off": off, "off-secure": [*off, "--secure"]}
    for name, extra in runs.items():
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
    docs = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in runs}
    tables = {n: np.load(tmp_path / n / "embeddings.npz")["products"] for n in runs}
    for doc in docs.values():  # every simulated organisation took part in every round
        assert [r["clients"] for r in doc["rounds"]] == [3, 3]
    assert _scores(docs["a"]) == _scores(docs["b"])
    assert np.array_equal(tables["a"], tables["b"])
    # secure aggregation sums bit for bit what the plain round sums: the same run, the same numbers
    assert np.array_equal(tables["a"], tables["secure"])
    assert _scores(docs["a"]) == _scores(docs["secure"])
    # and so without the pooled normaliser, whose uploads are half as wide; it changes the run (the control)
    assert np.array_equal(tables["off"], tables["off-secure"])
    assert _scores(docs["off"]) == _scores(docs["off-secure"])
    assert not np.array_equal(tables["a"], tables["off"])
    assert docs["a"]["config"]["train"]["pooled_normaliser_rows"] == 1000
