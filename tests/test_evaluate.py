"""simulations/evaluate.py on an organisation's own task (``--task``): one more scenario, every mode, the targets."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest

from simulations import evaluate

#: A task whose test and validation score is its seed / 10 + its organisation / 100, so a
#: table can only show those numbers if every run's seed reached the task; its head's
#: width grows with the organisation, so the heads differ (fedavg-all cannot run).
SEED_TASK = textwrap.dedent('''
    import torch
    from torch import nn

    from fedembed import SplitModel, Task


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.items = nn.EmbeddingBag(10, 4, mode="mean")
            self.head = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 1))

        def forward(self, ids):
            return self.head(self.items(ids)).squeeze(1)


    class SeedTask(Task):
        def __init__(self, data=None, seed=0, org=0, orgs=1, width=3):
            super().__init__(data, seed)
            self.value, self.name = int(seed) / 10 + int(org) / 100, f"unit-{org}"
            self.width = int(width) + int(org)

        def build_model(self):
            return SplitModel(Net(self.width), tables=["items"])

        def num_examples(self, split):
            return 8

        def batches(self, split, batch_size, rng):
            yield torch.arange(16).remainder(10).reshape(8, 2), torch.ones(8)

        def loss(self, model, batch):
            return nn.functional.mse_loss(model(batch[0]), batch[1])

        def evaluate(self, model, split):
            return {"score": self.value}
''')


@pytest.fixture(autouse=True)
def _logging_restored():
    """evaluate.main() configures logging as a script does (fedembed's loggers at ERROR); undo it for the other tests."""
    fed, root = logging.getLogger("fedembed"), logging.getLogger()
    saved = fed.level, root.level, list(root.handlers)
    yield
    fed.setLevel(saved[0])
    root.setLevel(saved[1])
    root.handlers[:] = saved[2]


@pytest.fixture
def seed_task(tmp_path: Path) -> str:
    path = tmp_path / "seed_task.py"
    path.write_text(SEED_TASK)
    return f"{path}:SeedTask"


def test_own_task_runs_as_a_scenario_in_every_mode_with_its_seeds(seed_task: str, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="evaluate"):
        code = evaluate.main(["--task", seed_task, "--option", "width=2", "--name", "units", "--orgs", "2",
                              "--seeds", "0", "1", "--rounds", "2", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "evaluate.json").read_text())
    assert set(doc["summary"]) >= {"units"}
    modes = doc["summary"]["units"]
    # every mode the heads allow; fedavg-all averages heads, and these differ: skipped, and said
    assert set(modes) == {"fedembed", "local", "pooled", "fedembed-guard"}
    assert "fedavg-all skipped" in caplog.text and "heads differ" in caplog.text
    for mode, row in modes.items():  # seed k reached every organisation's task: score k / 10 + org / 100
        assert row["unit-0"]["mean"] == pytest.approx(0.05), mode
        assert row["unit-1"]["mean"] == pytest.approx(0.06), mode
        assert row["mean"]["mean"] == pytest.approx(0.055), mode
    assert [t["target"] for t in doc["targets"]][:1] == ["units: fedembed - pooled"]
    assert "**units**" in (out / "evaluate.md").read_text()
    assert not (out / "synthetic").exists()  # with --task, no built-in scenario unless asked for


def test_own_task_options_are_checked(seed_task: str, tmp_path: Path, capsys) -> None:
    for argv, fault in (
        (["--option", "seed=3"], "each run's task seed is its --seeds value"),
        (["--name", "synthetic"], "is a built-in scenario"),
        (["--name", "../elsewhere"], "letters, digits"),
        (["--option", "width"], "expected KEY=VALUE"),
    ):
        with pytest.raises(SystemExit) as exc:
            evaluate.main(["--task", seed_task, *argv, "--out", str(tmp_path / "never")])
        assert exc.value.code == 2
        assert fault in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--option", "width=2", "--out", str(tmp_path / "never")])
    assert "give --task too" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    # a task that cannot be loaded stops the evaluation with the run and the fault, not a traceback
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--task", str(tmp_path / "absent.py:Nope"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "task fedembed seed 0:" in err and "absent.py" in err and "Traceback" not in err


def test_flower_engine_refuses_before_starting_a_subprocess(seed_task: str, tmp_path: Path, capsys, caplog,
                                                            monkeypatch) -> None:
    """Under ``--engine flower`` an unloadable task, or heads fedavg-all cannot average, are found in this process.

    The subprocess is never started for them; its failure, when it does fail, names the run
    and ends with what the subprocess said.
    """
    started: list[list[str]] = []

    def no_subprocess(cmd, **kwargs):
        started.append(cmd)
        return evaluate.subprocess.CompletedProcess(cmd, 3, stdout="", stderr="warming up\nFedembedError: disk full\n")

    monkeypatch.setattr(evaluate.subprocess, "run", no_subprocess)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--engine", "flower", "--task", str(tmp_path / "absent.py:Nope"), "--out", str(tmp_path / "a")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "task fedembed seed 0:" in err and "absent.py" in err and "not found" in err
    assert started == []
    # heads that differ: fedavg-all skipped with the reason, still without a subprocess
    with caplog.at_level(logging.WARNING, logger="evaluate"):
        code = evaluate.main(["--engine", "flower", "--task", seed_task, "--orgs", "2", "--modes", "fedavg-all",
                              "--seeds", "0", "--out", str(tmp_path / "b")])
    assert code == 0 and started == []
    assert "fedavg-all skipped" in caplog.text and "unit-1" in caplog.text
    # a subprocess that fails: the run is named with the end of its output, not a CalledProcessError traceback
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--engine", "flower", "--task", seed_task, "--orgs", "2", "--modes", "local", "--seeds", "0",
                       "--out", str(tmp_path / "c")])
    assert exc.value.code == 1 and len(started) == 1
    err = capsys.readouterr().err
    assert "task local seed 0: `fedembed simulate` exited with code 3" in err and "disk full" in err


def test_an_in_process_run_takes_the_sync_policy_its_flags_give(tmp_path):
    """`--extra="--sync full"` (dp_eval's, evaluate's) reached `fedembed simulate`'s parser and no organisation:
    every in-process organisation ran the default policy."""
    from fedembed.task import TaskSpec, simulated_federation

    tasks, names, _ = simulated_federation(TaskSpec("synthetic", {"seed": 0}), 2)
    t = evaluate.InProcessTransport(tmp_path, tasks, names, "full")
    assert {org.sync.mode for org in t.orgs.values()} == {"full"}
    assert {org.sync.mode for org in evaluate.InProcessTransport(tmp_path / "d", tasks, names).orgs.values()} == {"auto"}
    # and its DP noise is drawn from the run's seed, as `fedembed simulate` draws it: an in-process DP run repeats
    assert {o.noise_seed for o in evaluate.InProcessTransport(tmp_path / "s", tasks, names, seed=3).orgs.values()} == {
        "simulation/3"}
