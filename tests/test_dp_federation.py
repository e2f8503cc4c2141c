"""DP across rounds of a federation: the organisation holds its own floor and budget; its spend composes over rounds."""

import numpy as np
import pytest

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.dp.accounting import PrivacyLedger
from fedembed.dp.policy import DPPolicy
from fedembed.org import handle_content
from fedembed.recipe import TrainConfig
from fedembed.task import TaskSpec

TASK = TaskSpec("synthetic", {"orgs": 2, "rows": 2000, "examples": 300, "dim": 8, "hidden": 16})
DP = dict(dp_noise_multiplier=1.0, dp_clip=1.0, dp_selection_noise_multiplier=0.5, dp_row_threshold=5.0,
          dp_count_clip=3.0, keep_table_state=False, batch_size=16, max_row_weight=3)


def test_a_recipe_below_the_organisations_dp_floor_is_refused_before_it_trains(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    for org in t.orgs.values():
        org.dp_policy = DPPolicy(min_noise_multiplier=1.0)
    c = Coordinator(run_config(TASK, rounds=1), t)  # a coordinator that sends no DP at all
    reply = handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "refused"
    assert "dp_noise_multiplier 0.0 is below this organisation's minimum 1.0" in reply["info"]["error"]
    assert t.orgs[100].state.load_head() is None
    # the control: the same organisation trains a recipe at its floor (the two mechanisms as one: 1 / sqrt(1/2))
    at_floor = {**DP, "dp_noise_multiplier": 2 ** 0.5, "dp_selection_noise_multiplier": 2 ** 0.5}
    c2 = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**at_floor)), t)
    assert handle_content(t.orgs[100], c2.train_message(100, 1), "train", 100)["info"]["status"] == "ok"


def test_a_recipe_whose_selection_noise_is_below_the_floor_is_refused(tmp_path, direct_transport):
    """The floor holds the multiplier the ledger charges, the gradient's and the selection's noise as one
    mechanism: a gradient noise of 2 with a selection noise of 0.05 is a mechanism of 0.05. The floor held the
    gradient's alone, so this passed a floor of 1.1, and one round cost epsilon 1467 (the helper's deployed run)."""
    t = direct_transport(tmp_path, 2, task=TASK)
    t.orgs[100].dp_policy = DPPolicy(min_noise_multiplier=1.1)
    thin = {**DP, "dp_noise_multiplier": 2.0, "dp_selection_noise_multiplier": 0.05}
    c = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**thin)), t)
    reply = handle_content(t.orgs[100], c.train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "refused"
    assert ("noise multiplier (dp_noise_multiplier 2 with dp_selection_noise_multiplier 0.05, as its ledger charges "
            "them) 0.0499") in reply["info"]["error"] and "below this organisation's minimum 1.1" in reply["info"]["error"]
    assert t.orgs[100].state.load_head() is None
    thick = {**DP, "dp_noise_multiplier": 2.0, "dp_selection_noise_multiplier": 2.0}  # the control: 1.41 >= 1.1
    c2 = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**thick)), t)
    assert handle_content(t.orgs[100], c2.train_message(100, 1), "train", 100)["info"]["status"] == "ok"


def test_each_organisations_spend_composes_over_rounds_and_its_own_budget_stops_it(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    c = Coordinator(run_config(TASK, rounds=4, train=TrainConfig(**DP)), t)
    entries = [c.run_round(r, sorted(t.orgs)) for r in (1, 2)]
    eps = [e["privacy"]["org-0"]["epsilon"] for e in entries]
    assert 0 < eps[0] < eps[1]  # round 2 composes on round 1: the ledger is kept with the organisation's head
    saved = PrivacyLedger.from_dict(t.orgs[100].state.load_head()["dp_ledger"])
    assert len(saved.rounds) == 2 and saved.epsilon() == pytest.approx(eps[1])
    # org-1 sets its own budget just above what it has spent: the next round would exceed it
    t.orgs[101].dp_policy = DPPolicy(max_epsilon=eps[1] * 1.01)
    entry = c.run_round(3, sorted(t.orgs))
    assert "privacy budget is spent" in entry["rejected"]["org-1"]
    assert entry["clients"] == 1
    assert len(PrivacyLedger.from_dict(t.orgs[101].state.load_head()["dp_ledger"]).rounds) == 2  # nothing more spent
    assert entry["privacy"]["org-0"]["epsilon"] > eps[1]  # the other goes on
    # the one whose budget is spent stays in the run's privacy report, at what it spent (it was dropped from it)
    own = entries[1]["privacy"]["org-1"]["epsilon"]
    assert entry["privacy"]["org-1"]["epsilon"] == pytest.approx(own)
    assert f"(epsilon {own:.4g} spent)" in entry["rejected"]["org-1"]


def _dp_run(root, direct_transport, **kw):
    task = TaskSpec("synthetic", {"orgs": 3, "rows": 1000, "examples": 120, "dim": 8, "hidden": 16})
    t = direct_transport(root, 3, task=task)
    for i, org in enumerate(t.orgs.values()):
        org.noise_seed = f"noise-{i}"  # the same noise in both runs (in a deployment: each its own secret key)
    c = Coordinator(run_config(task, rounds=2, train=TrainConfig(**DP), **kw), t)
    entries = [c.run_round(r, sorted(t.orgs)) for r in (1, 2)]
    return c.tables.tables, entries


def test_record_level_dp_with_secure_aggregation_ends_bit_identical_to_dp_in_the_clear(tmp_path, direct_transport):
    """The noise is added the same way (each organisation's own, from the same seeds) before aggregation, and
    plain and secure sums share one fixed point: the tables agree bit for bit, and so do the epsilons."""
    plain, pe = _dp_run(tmp_path / "plain", direct_transport)
    secure, se = _dp_run(tmp_path / "secure", direct_transport, secure=True, row_set="union")
    assert all(e["clients"] == 3 and "abandoned" not in e for e in pe + se)
    for name in plain:
        assert np.array_equal(plain[name], secure[name])
    assert pe[-1]["privacy"] == se[-1]["privacy"]


def test_the_progress_display_shows_each_organisations_epsilon_and_delta_after_a_round(capsys):
    from fedembed.cli import _Progress, build_parser

    progress = _Progress(10, True)
    entry = {"round": 3, "clients": 2, "upload_bytes": 10, "dense_upload_bytes": 100, "download_bytes": 5,
             "wall_seconds": 1.0, "rejected": {},
             "privacy": {"org-0": {"epsilon": 1.2345, "delta": 1e-5}, "org-1": {"epsilon": 2.5, "delta": 1e-5}}}
    progress.console.width = 200
    progress(entry)
    err = capsys.readouterr().err
    assert "privacy (epsilon, delta=1e-05): org-0 1.234, org-1 2.500" in err
    args = build_parser().parse_args(["simulate", "--target-epsilon", "8", "--delta", "1e-6"])  # the names
    assert (args.dp_target_epsilon, args.dp_target_delta) == (8.0, 1e-6)


def test_the_local_baseline_reports_the_same_spend_under_the_same_dp():
    from fedembed.baselines import run_baseline
    from fedembed.task import load_task

    task = TaskSpec("synthetic", {"orgs": 2, "rows": 1000, "examples": 120, "dim": 8, "hidden": 16})
    cfg = run_config(task, rounds=2, mode="local", train=TrainConfig(**DP))
    log, _ = run_baseline(cfg, [load_task(task.for_org(i, 2)) for i in range(2)], ["org-0", "org-1"])
    eps = [r["privacy"]["org-0"]["epsilon"] for r in log.rounds]
    assert 0 < eps[0] < eps[1] and log.rounds[1]["privacy"]["org-0"]["delta"] == 1e-5


def test_user_level_dp_spends_per_user_and_a_task_without_users_refuses_it_signed(tmp_path, direct_transport):
    """dp_unit user: the ledger's population is the organisation's users (a user with all their records is the
    unit); an organisation whose task does not say which records belong together refuses the recipe, by name."""
    users = TaskSpec("synthetic", {**TASK.options, "users": 25})
    t = direct_transport(tmp_path / "users", 2, task=users)
    c = Coordinator(run_config(users, rounds=1, train=TrainConfig(**DP, dp_unit="user")), t)
    entry = c.run_round(1, sorted(t.orgs))
    assert entry["clients"] == 2 and entry["privacy"]["org-0"]["epsilon"] > 0
    ledger = PrivacyLedger.from_dict(t.orgs[100].state.load_head()["dp_ledger"])
    assert [r.population for r in ledger.rounds] == [25]
    t2 = direct_transport(tmp_path / "records", 2, task=TASK)
    c2 = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**DP, dp_unit="user")), t2)
    entry = c2.run_round(1, sorted(t2.orgs))
    assert entry["clients"] == 0 and "which records belong together" in entry["rejected"]["org-0"]


@pytest.mark.parametrize(("recipe", "fault"), [
    ({"dp_target_epsilon": 5.0}, "dp_target_epsilon 5 without a DP mode"),
    ({"dp_unit": "user"}, "dp_unit 'user' is the unit of record-level DP"),
    ({"dp_unit": "user", "dp_sum_noise_multiplier": 1.0}, "distributed noise protects a whole organisation's update"),
])
def test_a_dp_setting_that_would_do_nothing_is_refused(recipe, fault):
    """`simulate --target-epsilon 5` (or `--dp-unit user`) with no DP mode ran to the end without DP, exit 0."""
    from fedembed.recipe import RecipeError

    with pytest.raises(RecipeError, match=fault):
        TrainConfig(**recipe)
    TrainConfig(**{**DP, **{k: v for k, v in recipe.items() if k != "dp_sum_noise_multiplier"}})  # with DP: taken


def test_an_organisation_with_its_own_budget_refuses_a_recipe_without_dp(tmp_path, direct_transport):
    t = direct_transport(tmp_path, 2, task=TASK)
    t.orgs[100].dp_policy = DPPolicy(max_epsilon=1e4)
    reply = handle_content(t.orgs[100], Coordinator(run_config(TASK, rounds=1), t).train_message(100, 1), "train", 100)
    assert reply["info"]["status"] == "refused" and "turns no DP on" in reply["info"]["error"]
    assert t.orgs[100].state.load_head() is None
    c2 = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**DP)), t)  # the control: a DP recipe
    assert handle_content(t.orgs[100], c2.train_message(100, 1), "train", 100)["info"]["status"] == "ok"


def test_a_simulation_whose_budget_allows_not_one_round_fails_instead_of_reporting_untrained_scores(tmp_path,
                                                                                                     direct_transport):
    """`simulate --dp-noise-multiplier 1 --target-epsilon 0.5`: no organisation can train even once. It ran every
    round with the tables unchanged and exited 0 with a metrics.json of untrained scores."""
    from fedembed.coordinator import RunFailed

    t = direct_transport(tmp_path, 2, task=TASK)
    c = Coordinator(run_config(TASK, rounds=2, train=TrainConfig(**DP, dp_target_epsilon=0.01)), t, strict=True)
    with pytest.raises(RunFailed, match=r"no round changed the tables: .*its budget allows not even one round"):
        c.run()
    ok = Coordinator(run_config(TASK, rounds=1, train=TrainConfig(**DP)), direct_transport(tmp_path / "b", 2, task=TASK),
                     strict=True)
    ok.run()  # the control: a budget that allows a round
