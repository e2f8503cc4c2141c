"""A hostile coordinator against an organisation's private state: NaN and infinity in what it sends.

Organisations are the real :class:`fedembed.org.Organisation` code behind the in-process
transport (as in ``test_adversary_plain.py``); the coordinator crafts its own ``evaluate``
and ``train`` messages, as a modified coordinator would: a row sync whose values are NaN or
inf, a recipe or plan carrying a non-finite number (JSON carries ``NaN`` and ``Infinity``).
Before these checks a full resync of NaN rows with a FedRep recipe (``head_epochs``) was
cached and the private head re-fitted on it and saved as NaN, for good; ``head_lr=inf``
did the same. Every attack must be refused, signed, before anything on disk changes; each
has its control, the same message with finite values, which is taken.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from conftest import DirectTransport, run_config
from fedembed.config import RoundPlan
from fedembed.coordinator import Coordinator
from fedembed.identity import verify_reply
from fedembed.org import handle_content
from fedembed.recipe import TrainConfig
from fedembed.task import TaskSpec
from fedembed.wire import encode_arrays

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})
NODE = 100  # org-0, the organisation attacked
FEDREP = {"head_epochs": 1.0}  # the head is re-fitted (and saved) on every evaluate message


def _after_round_one(root: Path, **train) -> tuple[DirectTransport, Coordinator]:
    """Three organisations after an honest round 1 (org-0 holds a trained head and a table cache at version 1)."""
    t = DirectTransport(root, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=3, train=TrainConfig(**train)), t)
    c.run_round(1, sorted(t.orgs))
    return t, c


def _files(t: DirectTransport, node: int = NODE) -> dict[str, bytes]:
    """Every file of an organisation's state directory, by relative path, with its bytes."""
    root = t.orgs[node].state.dir
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _head_is_finite(t: DirectTransport, node: int = NODE) -> bool:
    saved = t.orgs[node].state.load_head()
    return all(bool(torch.isfinite(v).all()) for v in saved["head"].values() if v.is_floating_point())


def _full_resync(c: Coordinator, round_: int, message_type: str, poison=None) -> RecordDict:
    """A full resync (since 0, no request: scope ``all``) of the coordinator's true tables, ``poison``-ed in place.

    ``poison(name, rows)`` may change the float64 rows of each table before they are sent.
    """
    plan = RoundPlan.for_round(c.cfg, round_, 0, message_type == "evaluate")
    arrays = {}
    for name, (rows, _dim) in c.shapes.items():
        values = np.asarray(c.tables.tables[name], dtype=np.float64).copy()
        if poison is not None:
            poison(name, values)
        arrays[f"{name}.ids"] = np.arange(rows, dtype=np.int32)
        fits = np.abs(values[np.isfinite(values)]).max(initial=0.0) <= np.finfo(np.float32).max
        arrays[f"{name}.rows"] = values.astype(np.float32) if fits else values  # float64 only for what float32 cannot hold
        arrays[f"{name}.stamps"] = np.ones(rows, np.int32)
    return RecordDict({"config": ConfigRecord(plan.to_config()), "sync": encode_arrays(arrays)})


def _set_row(value: float, row: int | None):
    """A poison setting one row (or, with ``row=None``, every row) to ``value``."""
    def poison(_name: str, values: np.ndarray) -> None:
        values[slice(None) if row is None else row] = value
    return poison


def _refused(t: DirectTransport, c: Coordinator, reply: RecordDict, message_type: str, round_: int) -> str:
    """The reason of a signed refusal by org-0 (asserting that it is one)."""
    assert reply["info"]["status"] == "refused", dict(reply["info"])
    assert "update" not in reply and "metrics" not in reply
    assert verify_reply(reply, t.roster, c.cfg.run_key(), round_, message_type, NODE) == "org-0"  # it says who refused
    return str(reply["info"]["error"])


def _honest_round_trains(t: DirectTransport, c: Coordinator, round_: int) -> None:
    """The next honest round: org-0 takes part, its training loss is finite and so is the head it saves."""
    entry = c.run_round(round_, sorted(t.orgs))
    assert "org-0" not in entry["rejected"] and entry["clients"] == 3, entry["rejected"]
    replies = [r for node, kind, r in t.seen if node == NODE and kind == "train" and isinstance(r, RecordDict)]
    last = replies[-1]
    assert last["info"]["status"] == "ok" and math.isfinite(last["train"]["loss"])
    assert _head_is_finite(t)


# ------------------------------------------------------------------ (a) a sync of non-finite rows


@pytest.mark.parametrize(("message_type", "value", "row"), [
    ("evaluate", float("nan"), None),  # the reviewer's attack: every row NaN, the head re-fitted on them
    ("evaluate", float("nan"), 7),  # one poisoned row among the true ones
    ("evaluate", float("inf"), 7),
    ("evaluate", 1e300, 7),  # finite as float64, inf once cast to the float32 of the cache
    ("train", float("nan"), None),
])
def test_a_full_resync_of_non_finite_rows_is_refused_and_nothing_on_disk_changes(tmp_path, message_type, value, row):
    t, c = _after_round_one(tmp_path, **FEDREP)
    before = _files(t)
    assert "head.pt" in before and "tables.json" in before and _head_is_finite(t)
    msg = _full_resync(c, 2, message_type, _set_row(value, row))
    error = _refused(t, c, handle_content(t.orgs[NODE], msg, message_type, NODE), message_type, 2)
    assert "sync of table 'products'" in error and "non-finite" in error, error
    assert _files(t) == before  # head, its optimizer state, table cache, row state: byte for byte as they were
    _honest_round_trains(t, c, 2)


def test_control_the_same_full_resync_with_finite_rows_is_taken(tmp_path):
    t, c = _after_round_one(tmp_path, **FEDREP)
    head_before = _files(t)["head.pt"]
    reply = handle_content(t.orgs[NODE], _full_resync(c, 2, "evaluate"), "evaluate", NODE)
    assert reply["info"]["status"] == "ok" and math.isfinite(reply["metrics"]["val_score"])
    assert _files(t)["head.pt"] != head_before and _head_is_finite(t)  # re-fitted on the synced tables and saved
    tables, version = t.orgs[NODE].state.load_tables(dict(c.shapes), c.cfg.seed, c.cfg.table_scale, c.cfg.run_key())
    assert version == 1 and np.array_equal(tables["products"], c.tables.tables["products"])


# ------------------------------------------------------------------ (b) non-finite numbers in the recipe and plan


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One honest round 1 shared by the refusal tests below (each checks that it changed nothing on disk)."""
    return _after_round_one(tmp_path_factory.mktemp("nonfinite"), **FEDREP)


def _crafted(c: Coordinator, message_type: str, recipe: dict | None = None, plan: dict | None = None) -> RecordDict:
    """The coordinator's own round-2 message for org-0, its recipe and plan fields then overwritten as given."""
    msg = c._message(NODE, 2, message_type == "evaluate")
    config = dict(msg["config"])
    config["train"] = json.dumps({**json.loads(config["train"]), **(recipe or {})})  # NaN/Infinity: JSON carries them
    config.update(plan or {})
    return RecordDict({**dict(msg.items()), "config": ConfigRecord(config)})


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(("recipe", "plan", "named"), [
    ({"head_lr": INF}, {}, "head_lr"),  # the reviewer's second route: it passed "> 0"
    ({"table_lr": NAN}, {}, "table_lr"),
    ({"head_lr": -INF}, {}, "head_lr"),
    ({"lr_decay": NAN}, {}, "lr_decay"),
    ({"head_epochs": INF}, {}, "head_epochs"),
    ({"epochs": INF}, {}, "epochs"),
    ({"max_row_weight": INF}, {}, "max_row_weight"),
    ({"prox_mu": INF}, {}, "prox_mu"),
    ({"cooc_weight": NAN}, {}, "cooc_weight"),
    ({"head_weight_decay": NAN}, {}, "head_weight_decay"),
    ({"dp_update_clip": NAN}, {}, "dp_update_clip"),  # a clip, even of a mode that is off
    ({}, {"delta_clip": NAN}, "delta_clip"),  # the plan's own numbers
    ({}, {"table_scale": INF}, "table_scale"),
])
@pytest.mark.parametrize("message_type", ["evaluate", "train"])
def test_a_non_finite_number_in_the_recipe_or_plan_is_refused_naming_the_field(federation, message_type, recipe, plan,
                                                                                named):
    t, c = federation
    before = _files(t)
    reply = handle_content(t.orgs[NODE], _crafted(c, message_type, recipe, plan), message_type, NODE)
    error = _refused(t, c, reply, message_type, 2)
    assert named in error and ("finite" in error), error
    assert _files(t) == before


@pytest.mark.parametrize("message_type", ["evaluate", "train"])
def test_control_the_same_crafted_recipe_and_plan_with_finite_values_are_taken(tmp_path, message_type):
    t, c = _after_round_one(tmp_path, **FEDREP)
    recipe = {"head_lr": 0.02, "table_lr": 0.03, "lr_decay": 0.9, "head_epochs": 0.5, "epochs": 1, "max_row_weight": 2.0,
              "prox_mu": 0.1, "cooc_weight": 0.0, "head_weight_decay": 0.01, "dp_update_clip": 0.5}
    head_before = _files(t)["head.pt"]
    reply = handle_content(t.orgs[NODE], _crafted(c, message_type, recipe, {"delta_clip": 2.0}), message_type, NODE)
    assert reply["info"]["status"] == "ok", dict(reply["info"])
    assert math.isfinite(reply["metrics"]["val_score"])
    if message_type == "train":
        assert "update" in reply and math.isfinite(reply["train"]["loss"])
    assert _files(t)["head.pt"] != head_before and _head_is_finite(t)


# ------------------------------------------------------------------ (d) defence in depth: finite numbers, non-finite results


def _trains_again(t: DirectTransport, c: Coordinator) -> None:
    """After a refusal that came once its sync was applied (its cache moved on, the coordinator does not know it):
    round 2 may only ask for a resync, and round 3 trains."""
    entry = c.run_round(2, sorted(t.orgs))
    assert "stale" in entry["rejected"].get("org-0", "stale"), entry["rejected"]
    _honest_round_trains(t, c, 3)


@pytest.mark.parametrize(("message_type", "recipe"), [
    ("evaluate", {"head_lr": 1e30, "head_epochs": 1.0}),  # the head re-fit's loss turns non-finite after a step
    ("train", {"head_lr": 1e30}),  # local training's loss turns non-finite
    ("train", {"table_lr": 1e30}),  # every loss finite, but the head's Adam moments overflow (the state saved after)
])
def test_a_finite_recipe_that_makes_the_head_non_finite_saves_nothing(tmp_path, message_type, recipe):
    """A learning rate finite and > 0, yet so large that training overflows float32: the round is refused and the
    head and its optimizer state saved before are kept as they were, byte for byte; the organisation trains again."""
    t, c = _after_round_one(tmp_path)
    head_before = _files(t)["head.pt"]
    reply = handle_content(t.orgs[NODE], _crafted(c, message_type, recipe), message_type, NODE)
    error = _refused(t, c, reply, message_type, 2)
    assert "non-finite" in error and "nothing of it is kept" in error, error
    assert _files(t)["head.pt"] == head_before  # the head, its optimizer state and kept table moments as they were
    _trains_again(t, c)


def test_in_a_simulation_a_diverging_recipe_is_the_runs_error_not_a_round_of_refusals(tmp_path):
    """Every simulated organisation is the user's: training that diverges raises (the strict coordinator's
    RunFailed names it), where a deployed organisation refuses; nothing is kept either way."""
    from fedembed.train import NonFiniteError

    t, c = _after_round_one(tmp_path)
    head_before = _files(t)["head.pt"]
    with pytest.raises(NonFiniteError, match="non-finite"):
        handle_content(t.orgs[NODE], _crafted(c, "train", {"head_lr": 1e30}), "train", NODE, divergence_fails=True)
    assert _files(t)["head.pt"] == head_before


def test_a_sync_of_huge_finite_rows_cannot_make_the_saved_head_non_finite(tmp_path):
    """Finite rows pass the sync's check; rows of 1e30 make the head re-fit's Adam moments overflow with every loss
    finite. The re-fitted head is refused, never saved."""
    t, c = _after_round_one(tmp_path, **FEDREP)
    head_before = _files(t)["head.pt"]
    msg = _full_resync(c, 2, "evaluate", _set_row(1e30, None))
    error = _refused(t, c, handle_content(t.orgs[NODE], msg, "evaluate", NODE), "evaluate", 2)
    assert "the head re-fit" in error and "non-finite" in error, error
    assert _files(t)["head.pt"] == head_before
    _trains_again(t, c)


def test_a_head_saved_non_finite_before_these_checks_is_refused_and_left_as_it_is(tmp_path):
    """A head poisoned before this fix: the organisation never trains or serves on it, nor drops it silently."""
    t, c = _after_round_one(tmp_path)
    state = t.orgs[NODE].state
    saved = state.load_head()
    saved["head"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in saved["head"].items()}
    state.save_head(saved["head"], saved["optimizer"], saved["round"],
                    **{k: v for k, v in saved.items() if k not in ("head", "optimizer", "round")})
    poisoned = _files(t)["head.pt"]
    reply = handle_content(t.orgs[NODE], c.train_message(NODE, 2), "train", NODE)
    error = _refused(t, c, reply, "train", 2)
    assert "head.pt" in error and "non-finite" in error, error
    assert _files(t)["head.pt"] == poisoned


def test_a_table_cache_poisoned_before_these_checks_is_rebuilt_by_a_resync(tmp_path):
    """A table cache holding NaN rows (cached before syncs were checked) is a copy of the coordinator's tables: it is
    taken as damaged, the organisation asks for a resync from version 0 instead of training on it, and its next round
    trains on finite tables."""
    t = DirectTransport(tmp_path, 3, task=TASK)
    c = Coordinator(run_config(TASK, rounds=4), t)
    for round_ in (1, 2):
        c.run_round(round_, sorted(t.orgs))
    state = t.orgs[NODE].state
    shapes = dict(c.shapes)
    tables, version = state.load_tables(shapes, c.cfg.seed, c.cfg.table_scale, c.cfg.run_key())
    assert version == 1  # the next sync brings only the rows changed since: the NaN rows would stay
    tables["products"][:] = np.nan
    state.save_tables(tables, version, c.cfg.run_key())
    entry = c.run_round(3, sorted(t.orgs))
    assert "cache at version 0 was stale" in entry["rejected"]["org-0"], entry["rejected"]
    _honest_round_trains(t, c, 4)
    tables, version = state.load_tables(shapes, c.cfg.seed, c.cfg.table_scale, c.cfg.run_key())
    assert version == 3 and np.isfinite(tables["products"]).all()
