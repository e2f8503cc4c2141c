"""The per-organisation guard: served candidate chosen on validation; private parts never leave."""

import numpy as np
import pytest
import torch
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.guard import BLEND, LOCAL, SHARED, WEIGHTS, Blend, Guard, choose
from fedembed.tables import init_table
from fedembed.baselines.local import run_local
from fedembed.task import TaskSpec, load_task
from fedembed.recipe import TrainConfig

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})


def test_choose_averages_the_latest_validation_window_and_prefers_shared_on_ties():
    h = [{SHARED: 0.1, LOCAL: 0.9}, {SHARED: 0.6, LOCAL: 0.5}, {SHARED: 0.6, LOCAL: 0.5}]
    assert choose(h, window=3) == LOCAL  # means 0.433 vs 0.633
    assert choose(h, window=2) == SHARED  # the old round falls out of the window
    assert choose([{SHARED: 0.5, LOCAL: 0.5}], window=3) == SHARED
    assert choose([], window=3) == SHARED


def test_blend_candidate_serves_the_mean_of_both_outputs_and_loses_ties_to_shared():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(Blend(a, b, 0.5)(x), 0.5 * a(x) + 0.5 * b(x))
    assert choose([{SHARED: 0.5, BLEND: 0.6, LOCAL: 0.55}], window=1) == BLEND
    assert choose([{SHARED: 0.6, BLEND: 0.6, LOCAL: 0.6}], window=1) == SHARED
    assert choose([{SHARED: 0.5, BLEND: 0.6, LOCAL: 0.6}], window=1) == BLEND


def test_choice_is_made_on_validation_even_when_test_says_otherwise(tmp_path):
    task = load_task(TASK.for_org(0, 3))
    shapes = {"products": (400, 16)}
    shared = {"val_score": 0.5, "score": 0.9, "val_loss": 1.0, "loss": 0.1}
    twin = {"val_score": 0.8, "score": 0.1, "val_loss": 0.5, "loss": 2.0}
    out = Guard(tmp_path).step(
        task, TrainConfig(guard=True), shared, 1, 0, 0.1, "run", shapes, train=False, evaluate=lambda t, m: dict(twin)
    )
    assert out["guard_local"] == 1.0 and out["score"] == 0.1 and out["val_score"] == 0.8
    # the reverse: validation favours shared, test favours the twin
    shared2 = {"val_score": 0.9, "score": 0.1, "val_loss": 0.1, "loss": 2.0}
    twin2 = {"val_score": 0.1, "score": 0.9, "val_loss": 2.0, "loss": 0.1}
    out = Guard(tmp_path / "b").step(
        task, TrainConfig(guard=True), shared2, 1, 0, 0.1, "run", shapes, train=False,
        evaluate=lambda t, m: dict(twin2)
    )
    assert out["guard_local"] == 0.0 and out["score"] == 0.1
    assert out["shared_val_score"] == 0.9 and out["local_val_score"] == 0.1


SEEDED = TaskSpec("synthetic", {"orgs": 3, "rows": 2000, "examples": 300, "dim": 8})  # heads seeded: runs repeat


def _run(tmp_path, transport, mode, task=TASK, **train):
    cfg = run_config(task, rounds=3, mode=mode, train=TrainConfig(**train))
    return Coordinator(cfg, transport).run()


#: A 600-row table: it carries the pooled normaliser and the coordinator moves it by half its sum, so the
#: local baseline keeps half of each epoch's move, and the twin must too.
SMALL = TaskSpec("synthetic", {"orgs": 3, "rows": 600, "touch": 0.2, "examples": 300, "dim": 8})


@pytest.mark.parametrize("spec", [SEEDED, SMALL], ids=["2000 rows", "600 rows, half step"])
def test_the_twin_is_the_local_baseline_and_every_choice_matches_validation(tmp_path, direct_transport, spec):
    guarded = _run(tmp_path / "g", direct_transport(tmp_path / "g", 3, task=spec), "fedembed", spec, guard=True, guard_window=2)
    # the local baseline, run on its own in one process (fedembed.baselines.local)
    tasks = [load_task(spec.for_org(i, 3)) for i in range(3)]
    local = run_local(run_config(spec, rounds=3, mode="local"), tasks, [f"org-{i}" for i in range(3)])
    if spec is SMALL:  # the case where the twin's step matters: without it the baseline's scores differ
        whole = run_local(run_config(spec, rounds=3, mode="local", pooled_server_lr=1.0), tasks,
                          [f"org-{i}" for i in range(3)])
        assert whole.rounds[-1]["metrics"] != local.rounds[-1]["metrics"]
    for rg, rl in zip(guarded.rounds, local.rounds):
        for org, m in rg["metrics"].items():
            assert m["local_val_score"] == pytest.approx(rl["metrics"][org]["val_score"], abs=1e-12)
    for org in guarded.to_dict()["final"]:
        if org == "mean":
            continue
        hist = [guarded.initial[org]] + [r["metrics"][org] for r in guarded.rounds]  # every evaluation, in order
        assert len(hist) == 4
        for i, m in enumerate(hist):
            window = hist[max(0, i - 1) : i + 1]
            means = {n: np.mean([h[f"{n}_val_score"] for h in window]) for n in WEIGHTS}
            best = max(WEIGHTS, key=lambda n: (means[n], WEIGHTS[n]))
            assert m["guard_weight"] == WEIGHTS[best]
            assert m["val_score"] == m[f"{best}_val_score"]


def _wire(content) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(content).values())


def _windows(values: np.ndarray, width: int = 4, count: int = 16):
    flat = values.ravel()
    if flat.size < width:
        return
    for start in np.linspace(0, flat.size - width, num=min(count, flat.size - width + 1)).astype(int):
        yield flat[start : start + width]


def test_neither_the_residual_nor_the_twin_is_in_any_reply(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 3, task=TASK)
    _run(tmp_path, t, "fedembed", guard=True, residual=True)
    wire = b"".join(_wire(content) for _, _, content in t.seen)
    assert len(t.seen) == 3 * 4
    private = []
    for i in range(3):
        head = torch.load(tmp_path / f"org-{i}" / "head.pt", weights_only=True)["head"]
        res = head["products.residual.weight"].numpy()
        rows = np.flatnonzero(np.abs(res).sum(1))
        assert rows.size > 0, "the residual was trained"
        private.append(("residual", res[rows]))
        twin_dir = tmp_path / f"org-{i}" / "guard"
        twin_head = torch.load(twin_dir / "head.pt", weights_only=True)["head"]
        private += [(f"twin {k}", v.numpy()) for k, v in twin_head.items()]
        with np.load(twin_dir / "tables.npz") as z:
            twin = z["products"]
        moved = np.flatnonzero(np.abs(twin - init_table("products", (400, 16), 0, 0.1)).sum(1))
        assert moved.size > 0
        private.append(("twin table", twin[moved]))
    for what, values in private:
        for w in _windows(values):
            for enc in (w.astype(np.float32).tobytes(), w.astype(np.float16).tobytes()):
                assert enc not in wire, f"{what} values found on the wire"
    # control: what was uploaded is found by the same search
    for _, _, content in t.seen:
        if "update" in content:
            delta = content["update"]["products.delta"].numpy()
            assert next(iter(_windows(delta))).tobytes() in wire
