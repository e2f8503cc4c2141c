"""A task that breaks its contract is refused with its fault named, and a simulation fails loudly.

Each test plays an organisation's engineer who gets a task wrong the way one does (an
unreduced loss, no ``score``, a forgotten method, a bad option, a helper module beside the
task file), and checks the message names the fault, not a traceback deep in a step. The
controls are the same task done right.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedembed.coordinator import Coordinator, RunFailed
from fedembed.recipe import TrainConfig
from fedembed.task import TaskError, TaskSpec, load_task, resolve_task_class, simulated_federation, task_metrics
from fedembed.train import build_seeded, evaluate_splits, make_head_optimizer, train_local
from tests.conftest import DirectTransport, run_config

ROOT = Path(__file__).resolve().parents[1]

# a helper module beside the task file, imported by it as users do: `from labhelpers import ...`
HELPERS = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.items = nn.Embedding(rows, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.items(ids).mean(1)).squeeze(-1)
'''

TASKS = '''
import numpy as np
import torch
from torch import nn
from fedembed import SplitModel, Task
from labhelpers import Net


class Good(Task):
    def __init__(self, data=None, seed=0, rows=50, org=0, orgs=1, broken_org=-1):
        super().__init__(data, seed)
        self.org, self.broken = int(org), int(broken_org)
        rng = np.random.default_rng([int(seed), int(org)])
        self.rows = int(rows)
        self.x = torch.from_numpy(rng.integers(0, self.rows, (120, 3)))
        self.y = torch.from_numpy((rng.random(120) < 0.5).astype(np.float32))

    def build_model(self):
        return SplitModel(Net(self.rows), tables=["items"])

    def num_examples(self, split):
        return 40

    def batches(self, split, batch_size, rng):
        lo = {"train": 0, "val": 40, "test": 80}[split]
        for s in range(lo, lo + 40, batch_size):
            yield self.x[s:min(s + batch_size, lo + 40)], self.y[s:min(s + batch_size, lo + 40)]

    def losses(self, model, batch):
        return nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1], reduction="none")

    def loss(self, model, batch):
        return self.losses(model, batch).mean()

    def evaluate(self, model, split):
        with torch.no_grad():
            out = [(model(x) > 0).float().eq(y).float().mean().item() for x, y in self.batches(split, 40, None)]
        return {"score": float(np.mean(out)), "loss": 0.5}


class Unreduced(Good):  # the per-example loss, not reduced: on organisation broken_org only (all when -1)
    def loss(self, model, batch):
        return self.losses(model, batch) if self.broken in (-1, self.org) else super().loss(model, batch)


class LargeBatchUnreduced(Good):  # right on small batches, unreduced on a batch of more than 8: passes the start check
    def loss(self, model, batch):
        return self.losses(model, batch) if len(batch[1]) > 8 else super().loss(model, batch)


class Raising(Good):  # a head whose output does not fit the targets
    def loss(self, model, batch):
        return nn.functional.binary_cross_entropy_with_logits(model(batch[0]).unsqueeze(1).expand(-1, 2), batch[1])


class NoScore(Good):
    def evaluate(self, model, split):
        return {"accuracy": 0.5}


class TextMetric(Good):
    def evaluate(self, model, split):
        return {"score": 0.5, "note": "fine"}


class Forgetful(Task):  # no num_examples, no evaluate
    def build_model(self):
        return SplitModel(Net(10), tables=["items"])

    def batches(self, split, batch_size, rng):
        return iter(())

    def loss(self, model, batch):
        return torch.zeros(())


class Picky(Good):  # its own constructor refuses a value
    def __init__(self, data=None, seed=0, width="1", org=0, orgs=1):
        super().__init__(data, seed, org=org, orgs=orgs)
        self.width = int(width)
'''


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("labtasks")
    (d / "labhelpers.py").write_text(HELPERS)
    (d / "labtasks.py").write_text(TASKS)
    return d / "labtasks.py"


def _spec(task_file: Path, cls: str, **options) -> TaskSpec:
    return TaskSpec(f"{task_file}:{cls}", {"seed": 0, **options})


def _train_once(task_file: Path, cls: str):
    task = load_task(_spec(task_file, cls))
    cfg = TrainConfig()
    model = build_seeded(task, 0, "lab")
    return train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(0))


def test_a_task_file_imports_the_module_beside_it_from_any_directory(task_file, tmp_path):
    """As when Python runs a script: ``from labhelpers import Net`` works whatever the working directory."""
    code = (f"from fedembed.task import resolve_task_class; "
            f"print(resolve_task_class({str(task_file) + ':Good'!r}).__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Good"
    # control: the helper module is not importable from there by itself
    plain = subprocess.run([sys.executable, "-c", "import labhelpers"], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode != 0 and "labhelpers" in plain.stderr


def test_an_unreduced_loss_is_refused_naming_its_shape(task_file):
    with pytest.raises(TaskError, match=r"loss\(model, batch\) returned a tensor of shape \(16,\).*scalar.*mean"):
        _train_once(task_file, "Unreduced")
    _, stats = _train_once(task_file, "Good")  # control: the same task, reduced, trains its 3 batches of 16
    assert stats["steps"] == 3


def test_a_loss_that_raises_is_named_with_its_error(task_file):
    with pytest.raises(TaskError, match=r"loss\(model, batch\) raised ValueError: Target size"):
        _train_once(task_file, "Raising")


def test_metrics_without_a_score_or_with_text_are_refused(task_file):
    for cls, fault in (("NoScore", r"returned \['accuracy'\] without a 'score'"),
                       ("TextMetric", r"gave 'note' = 'fine': metrics must be real numbers")):
        task = load_task(_spec(task_file, cls))
        with pytest.raises(TaskError, match=fault):
            evaluate_splits(task, build_seeded(task, 0, "lab"))
    good = load_task(_spec(task_file, "Good"))
    metrics = task_metrics(good, build_seeded(good, 0, "lab"), "val")
    assert set(metrics) == {"score", "loss"} and all(isinstance(v, float) for v in metrics.values())


def test_a_task_missing_methods_is_refused_naming_them(task_file):
    with pytest.raises(TaskError, match="does not implement evaluate, num_examples"):
        resolve_task_class(f"{task_file}:Forgetful")


def test_a_constructor_that_fails_is_named_with_the_options_it_got(task_file):
    with pytest.raises(TaskError, match=r"failed to build with options .*'width': 'abc'.*ValueError: invalid literal"):
        load_task(_spec(task_file, "Picky", width="abc"))
    assert load_task(_spec(task_file, "Picky", width="3")).width == 3


def test_a_simulation_refuses_options_it_sets_itself(task_file):
    with pytest.raises(TaskError, match="orgs=5 contradicts the 3 simulated organisations"):
        simulated_federation(_spec(task_file, "Good", orgs=5), 3)
    with pytest.raises(TaskError, match="org=1: a simulation gives each of its 3 organisations its own index"):
        simulated_federation(_spec(task_file, "Good", org=1), 3)
    _, names, _ = simulated_federation(_spec(task_file, "Good", orgs=3), 3)  # the same number: nothing contradicted
    assert len(names) == 3


def test_a_strict_run_fails_naming_the_organisation_whose_task_broke(task_file, tmp_path):
    """One organisation's loss is unreduced: a simulation stops, naming it; a deployment's round goes on without it."""
    spec = _spec(task_file, "Unreduced", orgs=3, broken_org=1)
    strict = Coordinator(run_config(spec, rounds=2), t := DirectTransport(tmp_path / "s", 3, task=spec),
                         roster=t.roster, strict=True)
    with pytest.raises(RunFailed, match=r"round 1: node 101 failed: .*organisation 'org-1': the task's loss"):
        strict.run()

    lenient = Coordinator(run_config(spec, rounds=2), t := DirectTransport(tmp_path / "l", 3, task=spec), roster=t.roster)
    log = lenient.run()
    assert [r["clients"] for r in log.rounds] == [2, 2]
    assert "organisation 'org-1'" in log.rounds[0]["rejected"]["node 101"]


def test_fedembed_simulate_checks_every_task_before_the_engine_starts(task_file, tmp_path, caplog, monkeypatch):
    """One loss and one evaluation per organisation at start: the fault is named before any round (or Ray)."""
    import fedembed.simulation
    from fedembed.cli import main

    class Started(RuntimeError):
        pass

    def engine(*args, **kwargs):
        raise Started

    monkeypatch.setattr(fedembed.simulation, "simulate", engine)
    for cls, fault in (("Unreduced", "organisation 'org-0': the task's loss(model, batch) returned a tensor of shape (8,)"),
                       ("NoScore", "organisation 'org-0': the task's evaluate(model, 'val') returned ['accuracy']")):
        caplog.clear()
        code = main(["simulate", "--task", f"{task_file}:{cls}", "--orgs", "2", "--out", str(tmp_path / cls)])
        assert code == 2 and fault in caplog.text  # and the engine never started (it would have raised Started)
    with pytest.raises(Started):  # control: a task that keeps the contract reaches the engine
        main(["simulate", "--task", f"{task_file}:Good", "--orgs", "2", "--out", str(tmp_path / "good")])


@pytest.mark.slow
def test_fedembed_simulate_exits_non_zero_naming_the_broken_task(task_file, tmp_path):
    """Real Flower simulation: every organisation's loss breaks on its first full batch, in round 1; the run exits 2
    with one line that names the organisation and the fault, and writes no metrics.json."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("fedembed")), "simulate", "--task", f"{task_file}:LargeBatchUnreduced", "--orgs", "2",
         "--rounds", "2", "--quiet", "--cpus", "1", "--out", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "ERROR fedembed: round 1:" in last and "the task's loss(model, batch) returned a tensor of shape" in last
    assert "organisation 'org-" in last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # no result that looks like one


def test_fedembed_client_checks_its_own_task_before_it_joins(task_file, tmp_path, caplog, monkeypatch):
    """An organisation's engineer learns of a broken task at start, not from the coordinator's log in round 1."""
    import fedembed.deploy
    from fedembed.cli import main

    class Joined(RuntimeError):
        pass

    def join(opts):
        raise Joined

    from fedembed.identity import make_identities

    monkeypatch.setattr(fedembed.deploy, "run_client", join)
    roster = make_identities(["lab"], tmp_path / "keys").write(tmp_path / "roster.json")
    common = ["client", "--state-dir", str(tmp_path / "org"), "--roster", str(roster), "--no-worker", "--insecure",
              "--identity-key", str(tmp_path / "keys" / "0.key")]
    assert main([*common, "--task", f"{task_file}:Unreduced"]) == 2
    assert "the task's loss(model, batch) returned a tensor of shape (8,)" in caplog.text
    with pytest.raises(Joined):  # control: a task that keeps the contract goes on to join
        main([*common, "--task", f"{task_file}:Good"])


def _clientapp_failure(monkeypatch, tasks, error: Exception):
    """The reply of a ClientApp whose organisation fails with ``error`` while handling a ``train`` message."""
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    import fedembed.org
    from fedembed.apps.client import make_client_app

    def handle(organisation, content, message_type, node, **kwargs):
        raise error

    monkeypatch.setattr(fedembed.org.Organisation, "from_node_config", staticmethod(lambda *a, **k: object()))
    monkeypatch.setattr(fedembed.org, "handle_content", handle)
    meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=5, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=600.0, message_type="train")
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    return make_client_app(tasks=tasks)(Message(RecordDict({"config": ConfigRecord({"round": 1})}), metadata=meta), ctx)


def test_a_deployed_organisation_that_fails_tells_the_coordinator_only_the_kind_of_failure(monkeypatch, caplog):
    """Its error text may quote its data: it stays in the organisation's log; a simulation, all the user's, shows it."""
    secret = "patient 4711 has no label"
    for error in (TaskError(f"the task's loss(model, batch) raised KeyError: '{secret}'"), KeyError(secret)):
        caplog.clear()
        reply = _clientapp_failure(monkeypatch, None, error)
        assert reply.has_error() and secret not in reply.error.reason
        assert type(error).__name__ in reply.error.reason and "organisation's log" in reply.error.reason
        assert secret in caplog.text  # the organisation's own log has it all
    simulated = _clientapp_failure(monkeypatch, [TaskSpec("synthetic", {})], TaskError(secret))
    assert simulated.has_error() and secret in simulated.error.reason  # control: a simulation's reason is the error
    with pytest.raises(KeyError):  # and any other failure of a simulation reaches the engine as it is
        _clientapp_failure(monkeypatch, [TaskSpec("synthetic", {})], KeyError(secret))


def test_a_deployed_organisations_worker_replies_only_the_kind_of_failure(monkeypatch, caplog):
    """The same through the worker `fedembed client` keeps the task in: its error reply, which the SuperNode hands
    to the coordinator, names the kind of failure; the text stays in the worker's log."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    import fedembed.org
    import fedembed.task
    from fedembed.org import OrganisationFailed
    from fedembed.worker import organisation_handler

    secret = "patient 4711 has no label"

    def handle(organisation, content, message_type, node, **kwargs):
        raise KeyError(secret)

    stub = SimpleNamespace(table_specs=lambda: {}, task=None)
    monkeypatch.setattr(fedembed.org.Organisation, "from_node_config", staticmethod(lambda *a, **k: stub))
    monkeypatch.setattr(fedembed.org, "handle_content", handle)
    monkeypatch.setattr(fedembed.task, "check_task", lambda task: None)
    with pytest.raises(OrganisationFailed) as info:
        organisation_handler({})("train", 5, RecordDict())
    assert secret not in str(info.value) and "KeyError" in str(info.value)
    assert secret in caplog.text


@pytest.mark.slow
def test_fedembed_client_with_a_broken_task_stops_instead_of_joining(task_file, tmp_path):
    """Real `fedembed client` (its worker checks the task): exit 2 with the fault, no restart loop, no SuperNode left."""
    from fedembed.identity import make_identities

    roster = make_identities(["lab"], tmp_path / "keys").write(tmp_path / "roster.json")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("fedembed")), "client", "--superlink", "127.0.0.1:9", "--insecure",
         "--state-dir", str(tmp_path / "org"), "--roster", str(roster), "--identity-key", str(tmp_path / "keys" / "0.key"),
         "--task", f"{task_file}:Unreduced"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "the task's loss(model, batch) returned a tensor of shape (8,)" in done.stderr
    assert "its task failed its check at start" in done.stderr.strip().splitlines()[-1]
    assert "starting it again" not in done.stderr and "Traceback" not in done.stderr


def test_a_round_below_min_orgs_says_its_tables_are_unchanged_where_the_user_looks(task_file, tmp_path):
    """A deployment whose round has fewer usable updates than --min-orgs keeps its tables, and says so in the round's
    log entry (metrics.json) and in the progress display, not only in the ServerApp's own logger."""
    from rich.console import Console

    from fedembed.cli import _Progress

    spec = _spec(task_file, "Unreduced", orgs=3, broken_org=1)
    for min_orgs, unchanged in ((3, True), (2, False)):  # control: with 2 of 3 required, the round is applied
        t = DirectTransport(tmp_path / f"m{min_orgs}", 3, task=spec)
        c = Coordinator(run_config(spec, rounds=1, min_orgs=min_orgs), t, roster=t.roster)
        start = {n: a.copy() for n, a in c.tables.tables.items()}
        progress = _Progress(1, True)
        progress.console = Console(record=True, width=200)
        c.on_round = progress
        c.run()
        entry = c.log.rounds[0]
        assert entry["clients"] == 2
        same = all(np.array_equal(start[n], c.tables.tables[n]) for n in start)
        assert same is unchanged
        assert ("unchanged" in entry) is unchanged
        shown = progress.console.export_text()
        assert ("round 1: tables unchanged: 2 usable update(s), fewer than --min-orgs 3" in shown) is unchanged
