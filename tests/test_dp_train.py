"""The DP hook of local training: a TrainConfig DP group, (epsilon, delta) in the stats, a budget that stops training."""

from __future__ import annotations

import numpy as np
import pytest

from fedembed.dp import BudgetExhausted
from fedembed.dp.accounting import PrivacyLedger
from fedembed.recipe import RecipeError, TrainConfig
from fedembed.sparse import validate_update
from fedembed.task import SyntheticTask
from fedembed.train import make_head_optimizer, train_local

DP = dict(dp_noise_multiplier=1.0, dp_clip=1.0, dp_selection_noise_multiplier=0.5, dp_row_threshold=5.0,
          dp_count_clip=3.0, keep_table_state=False, batch_size=16, max_row_weight=3)


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(orgs=2, rows=2000, examples=300, dim=8, hidden=16)


def test_dp_is_off_by_default_and_refuses_training_outside_the_mechanism():
    assert not TrainConfig().dp
    assert TrainConfig(dp_noise_multiplier=1.0).dp
    for extra in ({"cooc_weight": 0.1}, {"head_epochs": 1}, {"residual": True}, {"dp_row_threshold": 0.0}):
        with pytest.raises(RecipeError):
            TrainConfig(dp_noise_multiplier=1.0, **extra)


def test_a_dp_round_uploads_released_rows_with_dp_weights_and_reports_epsilon(task):
    model = task.build_model()
    start = model.get_tables()
    cfg = TrainConfig(**DP)
    ledger = PrivacyLedger(target_delta=1e-5)
    update, stats = train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(0),
                                start_tables=start, dp_ledger=ledger)
    u = update["ids"]
    validate_update(update, model.table_shapes(), max_weight=cfg.max_row_weight)
    assert 0 < u.num_rows < 2000
    now = model.get_tables()["ids"]
    others = np.setdiff1d(np.arange(2000), u.ids)
    np.testing.assert_array_equal(now[others], start["ids"][others])  # nothing outside the upload moved
    # weights: steps that released the row (post-processing of DP outputs), capped; never the raw lookup counts
    assert set(np.unique(u.weight).tolist()) <= {1.0, 2.0, 3.0}
    assert stats["dp_epsilon"] == pytest.approx(ledger.epsilon()) and stats["dp_delta"] == 1e-5
    assert stats["steps"] == stats["dp_steps"] == ledger.rounds[0].steps


def test_the_budget_stops_training_before_a_round_that_would_exceed_it(task):
    model = task.build_model()
    start = model.get_tables()
    probe = task.build_model()
    _, first = train_local(task, probe, TrainConfig(**DP), make_head_optimizer(probe, TrainConfig(**DP), None),
                           np.random.default_rng(0), start_tables=probe.get_tables())
    budget = 2.5 * first["dp_epsilon"]  # room for two rounds or more, not for fifty
    cfg = TrainConfig(**DP, dp_target_epsilon=budget)
    ledger = PrivacyLedger(target_delta=1e-5, target_epsilon=budget, method="rdp")
    rounds = 0
    with pytest.raises(BudgetExhausted, match="stops training"):
        for _ in range(50):
            train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(rounds),
                        start_tables=start, dp_ledger=ledger)
            rounds += 1
    assert rounds >= 2 and ledger.epsilon() <= budget and len(ledger.rounds) == rounds
    frozen = model.get_tables()["ids"].copy()
    with pytest.raises(BudgetExhausted):
        train_local(task, model, cfg, make_head_optimizer(model, cfg, None), np.random.default_rng(99),
                    start_tables=start, dp_ledger=ledger)
    np.testing.assert_array_equal(model.get_tables()["ids"], frozen)  # refused before any step
