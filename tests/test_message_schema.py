"""One typed schema for the config of every message of a round: parsed strictly on the organisation's side."""

import pytest

from conftest import run_config
from fedembed.config import ConfigError, RoundPlan, StageHeader
from fedembed.coordinator import Coordinator
from fedembed.org import handle_content
from fedembed.task import TaskSpec

TASK = TaskSpec("examples.my_task:ClicksTask", {"orgs": 2, "products": 200})


def test_a_plan_is_a_stage_header_and_round_trips():
    plan = RoundPlan(round=3, run_key="k", since=2, evaluate_only=False, federation="{}", seed=0, table_scale=0.1,
                     wire_dtype="float16", train="{}")
    assert isinstance(plan, StageHeader)
    assert RoundPlan.from_config(plan.to_config()) == plan
    header = StageHeader.from_config({"round": 3, "run_key": "k"})
    assert header == StageHeader(round=3, run_key="k", drop="{}")


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        ({"mode": "fedavg-all"}, r"fields outside its schema: \['mode'\]"),
        ({"round": "3"}, "'round' must be int, got str"),
        ({"round": True}, "'round' must be int, got bool"),
        ({"evaluate_only": 0}, "'evaluate_only' must be bool, got int"),
        ({"table_scale": "0.1"}, "'table_scale' must be a number, got str"),
    ],
)
def test_a_plan_outside_its_schema_is_refused_naming_the_field(change, fault):
    cfg = {"round": 1, "run_key": "k", "since": 0, "evaluate_only": False, "federation": "{}", "seed": 0,
           "table_scale": 0.1, "wire_dtype": "float16", "train": "{}"}
    assert RoundPlan.from_config(cfg).round == 1  # the control: the plan as sent is taken
    with pytest.raises(ConfigError, match=fault):
        RoundPlan.from_config({**cfg, **change})


def test_a_missing_field_is_named():
    with pytest.raises(ConfigError, match="lacks 'run_key'"):
        StageHeader.from_config({"round": 1})


def test_an_organisation_refuses_a_coordinator_plan_with_an_extra_field_before_training(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    msg = Coordinator(run_config(TASK, rounds=1), t).train_message(100, 1)
    msg["config"]["mode"] = "local"  # an old baseline switch, or anything else a plan does not hold
    reply = handle_content(t.orgs[100], msg, "train", 100)
    assert reply["info"]["status"] == "refused"
    assert "message config has fields outside its schema: ['mode']" in reply["info"]["error"]
    assert t.orgs[100].state.load_head() is None


def test_the_coordinator_files_a_signed_refusal_under_the_organisations_name(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1), t)
    original = c._message

    def with_extra(node, round_, evaluate_only):  # the coordinator's message to node 101 carries a field too many
        msg = original(node, round_, evaluate_only)
        if node == 101:
            msg["config"]["mode"] = "local"
        return msg

    c._message = with_extra
    entry = c.run_round(1, [100, 101])
    assert set(entry["rejected"]) == {"org-1"}
    assert "refused the coordinator's message: message config has fields outside its schema" in entry["rejected"]["org-1"]
    assert entry["clients"] == 1


def test_a_round_so_late_its_learning_rates_decay_to_zero_is_refused_before_training(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    msg = Coordinator(run_config(TASK, rounds=1), t).train_message(100, 1)
    msg["config"]["round"] = 10_000  # 0.8 ** 9999 is 0.0 in floating point
    reply = handle_content(t.orgs[100], msg, "train", 100)
    assert reply["info"]["status"] == "refused" and "must be > 0" in reply["info"]["error"]
    assert t.orgs[100].state.load_head() is None


def test_a_reply_without_its_info_record_is_refused_saying_so(tmp_path):
    from flwr.app import RecordDict

    from conftest import DirectTransport

    def no_info(node, content):
        return RecordDict({k: v for k, v in content.items() if k != "info"}) if node == 101 else content

    t = DirectTransport(tmp_path, 2, task=TASK, tamper=no_info)
    entry = Coordinator(run_config(TASK, rounds=1), t).run_round(1, [100, 101])
    assert "no 'info' record" in entry["rejected"]["org-1"] and entry["clients"] == 1


@pytest.mark.parametrize(
    ("shares", "fault"),
    [
        ('{"nope": 0.5}', "names table 'nope', which is not one of the federation's"),
        ('{"products": 0}', "must be a number in (0, 2], got 0"),
        ('{"products": NaN}', "must be a number in (0, 2], got nan"),
        ('{"products": 1e30}', "must be a number in (0, 2], got 1e+30"),
        ('{"products": "0.5"}', "must be a number in (0, 2], got '0.5'"),
        ('[0.5]', "must map tables to shares, got list"),
        ("{", "kept_shares is not JSON"),
    ],
)
def test_an_organisation_refuses_a_plan_whose_twin_step_is_not_a_share_of_its_tables(tmp_path, direct_transport, shares,
                                                                                     fault):
    """The coordinator's step as the guard's twin takes it (``kept_shares``) is checked before anything runs."""
    from fedembed.recipe import TrainConfig

    t = direct_transport(tmp_path, 2, task=TASK)
    c = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(guard=True)), t)
    msg = c.train_message(100, 1)
    # the control: a 200-row table moves by half its sum, and the plan says so to the twin
    assert c.kept == {"products": 0.5} and RoundPlan.from_config(msg["config"]).shares(c.shapes) == c.kept
    msg["config"]["kept_shares"] = shares
    reply = handle_content(t.orgs[100], msg, "train", 100)
    assert reply["info"]["status"] == "refused"
    assert fault in reply["info"]["error"]
    assert t.orgs[100].state.load_head() is None  # nothing trained


def test_the_plan_carries_the_twins_step_only_with_a_twin_and_a_coordinator_never_asks_more_than_is_taken(
        tmp_path, direct_transport):
    from fedembed.recipe import TrainConfig

    t = direct_transport(tmp_path, 2, task=TASK)
    plain = Coordinator(run_config(TASK, rounds=1), t)
    assert RoundPlan.from_config(plain.train_message(100, 1)["config"]).kept_shares == "{}"  # no guard, no twin
    with pytest.raises(ConfigError, match="at most 2"):
        Coordinator(run_config(TASK, rounds=1, pooled_server_lr=3.0, train=TrainConfig(guard=True)), t)
    Coordinator(run_config(TASK, rounds=1, pooled_server_lr=3.0), t)  # without the guard a large step is the run's own
