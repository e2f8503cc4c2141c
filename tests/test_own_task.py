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
from fedembed.workingset import RowState, working_set

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
    for org in t.orgs.values():  # every organisation's cache is the coordinator's final table on every row it holds fresh
        cache, version = org.state.load_tables(c.shapes, cfg.seed, cfg.table_scale, cfg.run_key())
        fresh = RowState.load(org.state.dir, c.shapes, version, cfg.run_key()).fresh_mask("skus")
        assert version == 2 and np.array_equal(cache["skus"][fresh], table[fresh])
        assert fresh[working_set(org.task, c.shapes)["skus"]].all()  # which is every row its data looks up


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
        # The refusal is a signed reply: the coordinator names the organisation by its roster key.
        assert list(rejected) == ["org-2"]
        why = rejected["org-2"]
        assert "refused the coordinator's message: org-2: table 'skus' differs from the federation's: shape 402 x 16 here, 401 x 16 in the federation" in why
        assert f"vocabulary {Vocabulary.load(mine).digest} here, {federation(data).tables['skus'].vocabulary}" in why
    assert not (tmp_path / "org-2" / "head.pt").exists()  # refused before it trained anything


# ------------------------------------------------------------------ the real thing: processes, TLS, loopback


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """What a user does after reading the README, on loopback: two runs and an export.

    Run 1: org-0 and org-1 (their own files, their own state dirs) federate the SKU table
    for 2 rounds. Run 2: org-2 joins with a vocabulary of one SKU more and is refused. Then
    org-0 and org-1 export their trained models.
    """
    from test_deploy import BIN, Procs

    from fedembed.deploy import free_port

    root = tmp_path_factory.mktemp("deployed")
    procs = Procs(root)
    fedembed = str(BIN / "fedembed")
    d, certs = root / "data", root / "certs"
    times: dict[str, float] = {}

    def run(*cmd: str) -> str:
        res = subprocess.run(list(cmd), cwd=ROOT, env=procs.env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    def server(name: str, state: Path, port: int, *extra: str) -> subprocess.Popen:
        return procs.start(name, [
            fedembed, "server", "--federation", str(d / "federation.toml"), "--min-orgs", "2", "--batch-size", "64",
            "--state-dir", str(state), "--port", str(port), "--certfile", str(certs / "server.crt"),
            "--keyfile", str(certs / "server.key"), "--ca-certfile", str(certs / "ca.crt"),
            "--auth-key", str(certs), "--round-timeout", "120", *extra])

    def client(name: str, org: int, port: int, vocabulary: Path) -> subprocess.Popen:
        return procs.start(name, [
            fedembed, "client", "--superlink", f"127.0.0.1:{port}", "--state-dir", str(root / name),
            "--root-cert", str(certs / "ca.crt"), "--auth-key", str(certs / f"org-{org}.key"), "--roster", str(certs),
            "--task", "examples/baskets/task.py:BasketsTask", "--data", str(d / f"org-{org}.csv"),
            "--option", f"vocabulary={vocabulary}"])

    try:
        t0 = time.monotonic()
        run(fedembed, "certs", str(certs), "--orgs", "3")
        run(sys.executable, "-m", "examples.baskets.make_data", "--orgs", "3", "--out", str(d), "--baskets", "300")
        mine = root / "mine.txt"  # org-2's own idea of the vocabulary: one SKU more
        mine.write_text((d / "skus.txt").read_text() + "SKU-XTRA1\n")

        t = time.monotonic()
        port = free_port()
        s1 = server("server1", root / "server1", port, "--rounds", "2")
        clients = [client(f"org{i}", i, port, d / "skus.txt") for i in (0, 1)]
        s1.wait(timeout=400)
        times["run 1 (2 rounds, 2 orgs)"] = time.monotonic() - t
        for c in clients:
            procs.kill(c)

        t = time.monotonic()
        port = free_port()
        s2 = server("server2", root / "server2", port, "--rounds", "1", "--start-orgs", "3")
        clients = [client(f"run2-org{i}", i, port, d / "skus.txt") for i in (0, 1)] + [client("run2-org2", 2, port, mine)]
        s2.wait(timeout=400)
        times["run 2 (1 round, 3 orgs, 1 refused)"] = time.monotonic() - t
        for c in clients:
            procs.kill(c)

        t = time.monotonic()
        for i in (0, 1):
            run(fedembed, "export", "--state-dir", str(root / f"org{i}"), "--task", "examples/baskets/task.py:BasketsTask",
                "--data", str(d / f"org-{i}.csv"), "--option", f"vocabulary={d / 'skus.txt'}",
                "--out", str(root / f"model-{i}.pt"))
        times["2 exports"] = time.monotonic() - t
        times["total"] = time.monotonic() - t0
        print("deployed baskets:", {k: f"{v:.1f} s" for k, v in times.items()})
        return {"root": root, "data": d, "procs": procs, "codes": (s1.returncode, s2.returncode), "times": times}
    finally:
        procs.kill_all()


@pytest.mark.slow
@pytest.mark.deploy
def test_deployed_organisations_with_their_own_files_complete_the_run(deployed):
    assert deployed["codes"][0] == 0, deployed["procs"].log("server1")[-3000:]
    doc = json.loads((deployed["root"] / "server1" / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert r["clients"] == 2 and r["rejected"] == {} and r["rows_changed"] > 0
        assert set(r["metrics"]) == {"org-0", "org-1"}
    assert set(doc["final"]) == {"org-0", "org-1", "mean"}
    assert all(0 <= doc["final"][o]["score"] <= 1 for o in ("org-0", "org-1"))
    with np.load(deployed["root"] / "server1" / "embeddings.npz") as z:
        assert z["skus"].shape == (401, 16)


@pytest.mark.slow
@pytest.mark.deploy
def test_deployed_organisation_with_another_vocabulary_is_refused_naming_the_table(deployed):
    assert deployed["codes"][1] == 0, deployed["procs"].log("server2")[-3000:]
    out = deployed["procs"].log("server2")
    doc = json.loads((deployed["root"] / "server2" / "metrics.json").read_text())
    for rejected in [r["rejected"] for r in doc["rounds"]] + [doc["closing_evaluation"]["rejected"]]:
        assert list(rejected) == ["org-2"]  # its refusal is signed with its roster key: named, not a node id
        why = rejected["org-2"]
        assert "refused the coordinator's message: org-2: table 'skus' differs from the federation's: shape 402 x 16" in why
    assert all(r["clients"] == 2 and r["rows_changed"] > 0 for r in doc["rounds"])  # the others went on
    assert set(doc["final"]) == {"org-0", "org-1", "mean"}
    assert "left out org-2" in out and "table 'skus' differs" in out  # and the server said so
    assert not (deployed["root"] / "run2-org2" / "head.pt").exists()


@pytest.mark.slow
@pytest.mark.deploy
@pytest.mark.parametrize("org", [0, 1])
def test_exported_model_in_a_plain_module_scores_what_the_closing_evaluation_reported(deployed, org):
    d = deployed["data"]
    final = json.loads((deployed["root"] / "server1" / "metrics.json").read_text())["final"][f"org-{org}"]
    task = load_task(TaskSpec(f"{ROOT / 'examples' / 'baskets' / 'task.py'}:BasketsTask",
                              {"vocabulary": str(d / "skus.txt")}, str(d / f"org-{org}.csv")))
    module = task.build_model().module  # plain torch, as served: no fedembed wrapper
    module.load_state_dict(torch.load(deployed["root"] / f"model-{org}.pt", weights_only=True))  # strict
    test, val = task.evaluate(module, "test"), task.evaluate(module, "val")
    assert test["score"] == pytest.approx(final["score"], abs=1e-6)
    assert test["loss"] == pytest.approx(final["loss"], abs=1e-6)
    assert val["score"] == pytest.approx(final["val_score"], abs=1e-6)
    meta = json.loads((deployed["root"] / f"model-{org}.pt.json").read_text())
    assert meta["tables_version"] == 2 and meta["head_round"] == 2
