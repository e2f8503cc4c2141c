"""A user's own task (examples/baskets): string SKU ids through a published vocabulary, one CSV file per organisation.

The fast tests run the organisations in-process (no Flower), each with its own data file;
the slow one does what a user does after reading the README: certificates, data, a
``fedembed server`` and ``fedembed client`` processes over TLS on loopback, an organisation
with the wrong vocabulary refused, and ``fedembed export`` of a trained organisation.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DirectTransport
from examples.baskets.make_data import make_data
from examples.baskets.task import roc_auc
from fedembed.config import RunConfig
from fedembed.coordinator import Coordinator
from fedembed.identity import Identity, make_identities
from fedembed.org import Organisation
from fedembed.spec import FederationSpec, SpecError
from fedembed.tables import init_table
from fedembed.task import TaskSpec, load_task
from fedembed.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
TASK_FILE = f"{ROOT / 'examples' / 'baskets' / 'task.py'}:BasketsTask"  # the file-path form `--task` takes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("baskets"), orgs=3, baskets=300)


def org_spec(data, i: int, vocabulary: Path | None = None, **options) -> TaskSpec:
    """Organisation ``i``'s own task: its own file, the published (or another) vocabulary."""
    return TaskSpec(TASK_FILE, {"vocabulary": str(vocabulary or data["vocabulary"]), **options}, str(data["orgs"][i]))


def other_vocabulary(data, path: Path, change: str) -> Path:
    """A vocabulary that differs from the published one: one SKU more, or one SKU replaced (same size)."""
    ids = Vocabulary.load(data["vocabulary"]).ids()
    ids = ids + ["SKU-XTRA1"] if change == "one more" else ids[:-1] + ["SKU-XTRA1"]
    return Vocabulary.from_ids(ids).write(path)


class FilesTransport(DirectTransport):
    """:class:`DirectTransport` whose organisations each load their own task spec (own data file, own options)."""

    def __init__(self, root: Path, specs: list[TaskSpec]) -> None:
        names = [f"org-{i}" for i in range(len(specs))]
        self.roster = make_identities(names, root / "keys")
        self.identities = [Identity.load(root / "keys" / f"{i}.key", self.roster) for i in range(len(specs))]
        self.orgs = {100 + i: Organisation(i, root / names[i], self.identities[i], None, spec)
                     for i, spec in enumerate(specs)}
        self.tamper, self.resign, self.seen = None, True, []


def federation(data) -> FederationSpec:
    return FederationSpec.load(data["federation"])


# ------------------------------------------------------------------ the data and the task


def test_make_data_writes_the_vocabulary_each_orgs_file_and_the_spec(data, tmp_path):
    vocab = Vocabulary.load(data["vocabulary"])
    fed = federation(data)
    assert fed.tables["skus"].rows == vocab.rows == vocab.size + 1 and fed.tables["skus"].dim == 16
    assert fed.tables["skus"].vocabulary == vocab.digest
    skus = []
    for path in data["orgs"]:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["basket", "skus", "label"] and len(rows) == 300
        assert {r["label"] for r in rows} == {"0", "1"}
        skus.append({s for r in rows for s in r["skus"].split(";")})
    known = set(vocab.ids())
    assert all(s - known for s in skus)  # every organisation has SKUs the vocabulary does not know
    assert skus[0] & skus[1] & skus[2] & known  # a shared part of the catalogue
    assert all(s - set().union(*(o for o in skus if o is not s)) for s in skus)  # and a part of its own
    again = make_data(tmp_path, orgs=3, baskets=300)  # the same seed, the same files
    for a, b in zip([data["vocabulary"], *data["orgs"], data["federation"]],
                    [again["vocabulary"], *again["orgs"], again["federation"]]):
        assert a.read_bytes() == b.read_bytes()


def test_the_task_keys_skus_by_the_vocabulary_and_counts_the_unknown_ones(data, caplog):
    with caplog.at_level(logging.INFO):
        task = load_task(org_spec(data, 0))
    vocab = Vocabulary.load(data["vocabulary"])
    assert task.name == "org-0" and task.vocabularies() == {"skus": vocab}
    oov = int((task.ids == vocab.oov_row).sum())
    assert oov > 0 and f"{oov} of {len(task.ids)} SKU lookups out of the vocabulary" in caplog.text
    federation(data).check(task.table_specs())  # the organisation's model fits the published spec
    # the module form of the same task: the same tables
    assert load_task(TaskSpec("examples.baskets.task:BasketsTask", org_spec(data, 0).options,
                              str(data["orgs"][0]))).table_specs() == task.table_specs()


def test_splits_are_a_seeded_70_10_20_partition_of_the_files_rows(data):
    task = load_task(org_spec(data, 1))
    sizes = {s: task.num_examples(s) for s in ("train", "val", "test")}
    assert sizes == {"train": 210, "val": 30, "test": 60}
    assert sorted(np.concatenate(list(task.splits.values())).tolist()) == list(range(300))
    same = load_task(TaskSpec(TASK_FILE, {**org_spec(data, 1).options, "dim": 16}, str(data["orgs"][1])))
    assert all(np.array_equal(task.splits[s], same.splits[s]) for s in sizes)  # another instance, the same split
    other = load_task(TaskSpec(TASK_FILE, {**org_spec(data, 1).options, "seed": 1}, str(data["orgs"][1])))
    assert not np.array_equal(task.splits["test"], other.splits["test"])
    batches = list(task.batches("train", 64, np.random.default_rng(0)))
    assert sum(len(b[2]) for b in batches) == 210 and all(b[1][0] == 0 for b in batches)
    m = task.evaluate(task.build_model(), "test")
    assert set(m) == {"score", "loss"} and 0 <= m["score"] <= 1 and math.isfinite(m["loss"])


def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right():
    rng = np.random.default_rng(0)
    y, s = rng.random(200) < 0.3, rng.integers(0, 20, 200).astype(float)  # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert roc_auc(y.astype(float), s) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert roc_auc(np.ones(3), np.arange(3.0)) == 0.5


# ------------------------------------------------------------------ in-process federation


def test_three_organisations_with_their_own_files_federate_the_sku_table(data, tmp_path):
    cfg = RunConfig(federation=federation(data), rounds=2)
    t = FilesTransport(tmp_path, [org_spec(data, i) for i in range(3)])
    c = Coordinator(cfg, t, roster=t.roster)
    c.run()
    names = {"org-0", "org-1", "org-2"}
    assert [r["round"] for r in c.log.rounds] == [1, 2]
    for r in c.log.rounds:
        assert r["clients"] == 3 and r["rejected"] == {} and r["rows_changed"] > 0
        assert set(r["metrics"]) == names
    assert c.log.extra["closing_evaluation"]["rejected"] == {}
    final = c.log.final()
    for org in names:
        assert 0 <= final[org]["score"] <= 1 and math.isfinite(final[org]["loss"])
        assert math.isfinite(final[org]["val_score"])
    table = c.tables.tables["skus"]
    init = init_table("skus", table.shape, cfg.seed, cfg.table_scale)
    changed = np.any(table != init, axis=1)
    assert changed.sum() > 100  # the table learned
    assert changed[Vocabulary.load(data["vocabulary"]).oov_row]  # unknown SKUs trained the OOV row
    for org in t.orgs.values():  # every organisation's cache is the coordinator's final table
        cache, version = org.state.load_tables(c.shapes, cfg.seed, cfg.table_scale, cfg.run_key())
        assert version == 2 and np.array_equal(cache["skus"], table)


@pytest.mark.parametrize("change, differs", [
    ("one more", ["shape 402 x 16 here, 401 x 16 in the federation", "vocabulary sha256:"]),
    ("one replaced", ["vocabulary sha256:"]),
    ("dim", ["shape 401 x 8 here, 401 x 16 in the federation"]),
])
def test_an_organisation_with_another_vocabulary_or_dim_does_not_fit_the_federation(data, tmp_path, change, differs):
    if change == "dim":
        spec = org_spec(data, 2, dim=8)
    else:
        spec = org_spec(data, 2, vocabulary=other_vocabulary(data, tmp_path / "mine.txt", change))
    with pytest.raises(SpecError, match="table 'skus' differs from the federation's") as err:
        federation(data).check(load_task(spec).table_specs())
    for what in differs:
        assert what in str(err.value)
    assert ("vocabulary" in str(err.value)) == (change != "dim")
    assert ("shape" in str(err.value)) == (change != "one replaced")


def test_the_coordinator_leaves_out_an_organisation_whose_vocabulary_differs(data, tmp_path):
    mine = other_vocabulary(data, tmp_path / "mine.txt", "one more")
    t = FilesTransport(tmp_path, [org_spec(data, 0), org_spec(data, 1), org_spec(data, 2, vocabulary=mine)])
    c = Coordinator(RunConfig(federation=federation(data), rounds=2), t, roster=t.roster)
    c.run()
    refusals = [r["rejected"] for r in c.log.rounds] + [c.log.extra["closing_evaluation"]["rejected"]]
    for r in c.log.rounds:  # the others go on
        assert r["clients"] == 2 and r["rows_changed"] > 0 and set(r["metrics"]) == {"org-0", "org-1"}
    for rejected in refusals:
        # The refusal is an error reply, not a signed one: the coordinator names it by its node
        # (102, organisation 2's here); the organisation's name is what it says of itself.
        assert list(rejected) == ["node 102"]
        why = rejected["node 102"]
        assert "org-2: table 'skus' differs from the federation's: shape 402 x 16 here, 401 x 16 in the federation" in why
        assert f"vocabulary {Vocabulary.load(mine).digest} here, {federation(data).tables['skus'].vocabulary}" in why
    assert not (tmp_path / "org-2" / "head.pt").exists()  # refused before it trained anything
