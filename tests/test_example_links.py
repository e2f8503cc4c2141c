"""The link-prediction example (the evaluation's fourth scenario) generates what its docstring says and trains."""

import numpy as np
import pytest

from conftest import run_config
from examples.links import LinkTask
from fedembed.baselines import run_baseline
from fedembed.task import TaskSpec, load_task


def test_an_organisation_sees_half_the_nodes_and_the_same_seed_repeats_its_data():
    a, b = LinkTask(seed=3, org=1), LinkTask(seed=3, org=1)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert len(np.unique(a.x)) <= a.nodes // 2  # only its half of the nodes
    other = LinkTask(seed=3, org=2)
    assert set(np.unique(other.x)) != set(np.unique(a.x))  # another organisation, another half
    assert sum(a.num_examples(s) for s in ("train", "val", "test")) == 2000
    assert 0.3 < a.y.mean() < 0.7  # both classes, roughly balanced


def test_own_sets_how_far_organisations_label_the_same_pairs_apart():
    pairs = np.random.default_rng(0).integers(0, 300, (3000, 2))
    same = [LinkTask(seed=3, org=k, own=0.0).relation_labels(pairs) for k in range(3)]
    assert all((same[0] == s).all() for s in same[1:])  # own = 0: one relation for everyone
    apart = [LinkTask(seed=3, org=k, own=1.0).relation_labels(pairs) for k in range(3)]
    disagree = np.mean(apart[0] != apart[1])
    assert 0.2 < disagree < 0.8  # own = 1: only the nodes are common, the relations are not


def test_bad_options_are_refused_naming_them():
    with pytest.raises(ValueError, match="own"):
        LinkTask(own=1.5)
    with pytest.raises(ValueError, match="org"):
        LinkTask(org=5, orgs=5)


def test_pooled_training_learns_the_links():
    spec = TaskSpec("examples.links:LinkTask", {"orgs": 3})
    tasks = [load_task(spec.for_org(i, 3)) for i in range(3)]
    runlog, _ = run_baseline(run_config(spec, rounds=6, mode="pooled"), tasks, ["lab-0", "lab-1", "lab-2"])
    before = np.mean([m["score"] for m in runlog.initial.values()])
    after = runlog.to_dict()["final"]["mean"]["score"]
    assert after > 0.62 and after > before + 0.08  # chance is 0.5
