"""The pooled normaliser (fedembed.normaliser): each organisation's step re-scaled to the federation's normaliser.

The arithmetic first (what the coordinator ends with is ``sum_k w_k delta_k sqrt(v_k / v)``),
then the rounds: plain and secure sums of the wider uploads are the same numbers, and the
two attacks the normaliser opens, played by a hostile organisation: a plain upload with a
negative normaliser is refused with its sender's name; inside a secure sum, where it cannot
be seen, a sunk normaliser moves no row beyond ``clip * sum w``.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.normaliser import CLIP, PRIOR, check_upload, narrow, own_normaliser, upload_shapes, widen
from fedembed.recipe import RecipeError, TrainConfig
from fedembed.secagg.protocol import ClientSession
from fedembed.secagg.quantize import scale_for
from fedembed.secagg.vector import ValueScales, fixed_point_sum
from fedembed.sparse import TableUpdate, UpdateError, sum_updates
from fedembed.task import TaskSpec
from fedembed.wire import decode_update, encode_update


def synthetic(orgs=4, rows=3000):
    return TaskSpec("synthetic", {"orgs": orgs, "seed": 0, "rows": rows, "dim": 4})


def _update(ids, delta, v, clip=4.0):
    ids = np.asarray(ids, dtype=np.int64)
    return {"t": TableUpdate(ids, widen(np.asarray(delta, np.float32), np.asarray(v, np.float64), clip)[0],
                             np.ones(ids.size, np.float32))}


# ---------------------------------------------------------------- arithmetic


def test_the_normaliser_is_the_organisations_own_shrunk_to_its_mean_and_has_no_unit():
    rng = np.random.default_rng(0)
    sq = rng.uniform(0.1, 2.0, size=(50, 3))
    steps = rng.integers(1, 40, size=50).astype(float)
    v, clipped = own_normaliser(sq, steps)
    m = sq.sum(0) / steps.sum()
    assert clipped == 0
    np.testing.assert_allclose(v, (sq + PRIOR * m) / (steps + PRIOR)[:, None] / m.mean())
    # gradients 1000x larger (another loss scale) give the very same normaliser: there is no unit to agree on
    np.testing.assert_allclose(own_normaliser(sq * 1e6, steps)[0], v)
    # two rows with the same squared gradient per step, 10x the organisation's mean: the one seen 100 times keeps
    # most of it, the one seen once is pulled most of the way to the mean (1)
    v, _ = own_normaliser(np.array([[100.0], [10000.0], [1000.0]]), np.array([1.0, 100.0, 1000.0]))
    own = 100.0 / (11100.0 / 1101.0)  # its squared gradient per step, in units of the mean
    assert 1.0 < v[0, 0] < 2.0 and 0.9 * own < v[1, 0] < own
    # no gradient at all: every step keeps its size; a normaliser beyond CLIP is clipped and counted
    assert np.array_equal(own_normaliser(np.zeros((3, 2)), np.ones(3))[0], np.ones((3, 2)))
    v, clipped = own_normaliser(np.array([[1e9], [1.0], [1.0]] + [[1.0]] * 2000), np.ones(2003))
    assert clipped == 1 and v.max() == CLIP


def test_a_row_only_one_organisation_touched_moves_by_its_own_delta_through_the_fixed_point_sum():
    rng = np.random.default_rng(1)
    delta = rng.uniform(-0.05, 0.05, size=(30, 4)).astype(np.float32)
    v = rng.uniform(0.01, 50.0, size=(30, 4))
    up = _update(np.arange(30), delta, v)
    scales = ValueScales(n=1, clip_delta=4.0, max_weight=1.0)
    agg = narrow(fixed_point_sum([up], {"t": (100, 8)}, scales, "float32"), 4.0, {"t"})
    # the quantization error of the left half, times sqrt(CLIP / v): at most ~100x the sum's bound
    np.testing.assert_allclose(agg["t"].weighted_delta, delta, rtol=0, atol=200 * scales.bound())
    np.testing.assert_array_equal(agg["t"].weight, np.ones(30))


def test_shared_rows_move_by_every_delta_rescaled_from_its_own_normaliser_to_the_federations():
    d1, d2, d3 = np.array([[0.3, -0.1]]), np.array([[0.2, 0.4]]), np.array([[-0.1, 0.05]])
    v1, v2, v3 = np.array([[4.0, 0.5]]), np.array([[0.25, 2.0]]), np.array([[1.0, 1.0]])
    ups = [_update([7], d1, v1), _update([7], d2, v2), _update([7], d3, v3)]
    step = narrow(sum_updates(ups, ["t"]), 4.0, {"t"})["t"].weighted_delta
    v = (v1 + v2 + v3) / 3
    expected = d1 * np.sqrt(v1 / v) + d2 * np.sqrt(v2 / v) + d3 * np.sqrt(v3 / v)
    np.testing.assert_allclose(step, expected, rtol=1e-5)
    # the control: without the normaliser the row would move by the plain sum, which differs
    assert not np.allclose(step, d1 + d2 + d3, rtol=1e-2)


def test_uploads_are_twice_as_wide_only_under_the_normaliser_and_it_needs_adam_without_dp():
    assert upload_shapes({"a": (10, 4)}, {"a"}) == {"a": (10, 8)}
    assert upload_shapes({"a": (10, 4)}, set()) == {"a": (10, 4)}
    # a delta beyond the clip is clipped in the upload, and counted (the sum finds none left to warn of)
    wide, clipped = widen(np.array([[5.0, -1.0]]), np.ones((1, 2)), 4.0)
    assert clipped == 1 and np.abs(wide).max() <= 4.0
    for bad in ({"table_optimizer": "sgd"}, {"dp_noise_multiplier": 1.0}, {"dp_sum_noise_multiplier": 1.0}):
        with pytest.raises(RecipeError, match=f"pooled_normaliser .* got {next(iter(bad))}"):
            TrainConfig(pooled_normaliser=True, **bad)


def test_a_negative_or_oversized_normaliser_in_a_plain_upload_is_refused_with_the_table_named():
    up = _update([1, 2], [[0.1, 0.1], [0.2, 0.2]], [[1.0, 1.0], [2.0, 2.0]])
    check_upload(up, 4.0, {"t"})  # what widen makes passes
    for value in (-0.5, 4.5):
        bad = {"t": TableUpdate(up["t"].ids, up["t"].delta.copy(), up["t"].weight)}
        bad["t"].delta[0, 2] = value
        with pytest.raises(UpdateError, match="table 't': 1 normaliser entries outside"):
            check_upload(bad, 4.0, {"t"})


def test_a_step_beyond_its_normaliser_in_a_plain_upload_is_refused():
    """The clip as the step with a normaliser of 0: each half in range, but no honest widen() makes it
    (|left| <= sqrt(clip x right)). Accepted, it weighted the sender's step by sqrt(CLIP / v), 11 with 5
    organisations, and pinned the row to the clip alone, where the README bounds a plain weight by sqrt(n)."""
    n = 5
    attack = {"t": TableUpdate(np.array([4]), np.array([[4.0, 4.0, 0.0, 0.0]], np.float32), np.ones(1, np.float32))}
    with pytest.raises(UpdateError, match="table 't': 2 step entries beyond what their normaliser allows"):
        check_upload(attack, 4.0, {"t"})
    honest = [_update([4], [[-4.0, -4.0]], [[1.0, 1.0]]) for _ in range(n - 1)]
    for up in honest:
        check_upload(up, 4.0, {"t"})
    step = narrow(sum_updates([attack, *honest], ["t"]), 4.0, {"t"})["t"].weighted_delta
    assert step.min() > 3.9  # what it did: four honest organisations at -clip, the row at +clip


def test_every_upload_widen_makes_passes_the_check_after_the_float16_wire():
    rng = np.random.default_rng(0)
    clip = 4.0
    delta = rng.uniform(-1.5 * clip, 1.5 * clip, (2000, 8))
    delta[:100] = clip  # at the clip, with normalisers down to nothing
    v = np.concatenate([rng.uniform(0, CLIP, (1000, 8)), 10.0 ** rng.uniform(-12, 0, (1000, 8))])
    wide, _ = widen(delta, v, clip)
    wire = wide.astype(np.float16).astype(np.float32)
    check_upload({"t": TableUpdate(np.arange(2000, dtype=np.int64), wire, np.ones(2000, np.float32))}, clip, {"t"})


def test_an_organisation_claiming_the_largest_normaliser_weights_its_own_delta_up_by_less_than_sqrt_n():
    """A normaliser inside the range passes every check, so this is what one organisation can do with it (the
    README's "Not covered"): claiming CLIP on a row the others see as 1 weights its delta by
    sqrt(CLIP n / (CLIP + n - 1)) < sqrt(n) and every other organisation's down by sqrt(n / (CLIP + n - 1))."""
    n = 5
    deltas = [np.array([[0.1, -0.1]])] * n
    honest = narrow(sum_updates([_update([4], d, [[1.0, 1.0]]) for d in deltas], ["t"]), 4.0, {"t"})
    ups = [_update([4], deltas[0], [[CLIP, CLIP]])] + [_update([4], d, [[1.0, 1.0]]) for d in deltas[1:]]
    for up in ups:
        check_upload(up, 4.0, {"t"})  # every upload is one an honest organisation could send
    step = narrow(sum_updates(ups, ["t"]), 4.0, {"t"})["t"].weighted_delta
    own, other = np.sqrt(CLIP * n / (CLIP + n - 1)), np.sqrt(n / (CLIP + n - 1))
    np.testing.assert_allclose(step, deltas[0] * (own + (n - 1) * other), rtol=1e-5)
    np.testing.assert_allclose(honest["t"].weighted_delta, deltas[0] * n, rtol=1e-5)  # the control: the plain sum
    assert 2.1 < own < np.sqrt(n) and other < 0.25


def test_a_sum_whose_normaliser_was_sunk_moves_no_coordinate_beyond_clip_times_its_weight():
    ups = [_update([3], [[0.5, -0.5]], [[1.0, 1.0]]), _update([3], [[0.5, 0.2]], [[1.0, 1.0]])]
    agg = sum_updates(ups, ["t"])
    agg["t"].weighted_delta[:, 2:] = -1.0  # a hostile third party's normaliser took the sum below zero
    step = narrow(agg, 4.0, {"t"})["t"].weighted_delta
    assert np.all(np.isfinite(step)) and np.abs(step).max() <= 4.0 * 2 + 1e-9
    assert np.abs(step).max() == pytest.approx(8.0)  # bounded, and the bound is what held it


# ---------------------------------------------------------------- rounds


def _run(tmp_path, direct_transport, name, rows=3000, **kw):
    t = direct_transport(tmp_path / name, 4, task=synthetic(4, rows))
    c = Coordinator(run_config(synthetic(4, rows), rounds=1, **kw), t)
    c.run()
    return c, t


# the two ways a table carries the normaliser: the flag (any table), and the default for a table of at most
# pooled_normaliser_rows rows; each with the recipe that turns it off, the control
CARRIERS = [pytest.param(3000, TrainConfig(pooled_normaliser=True), TrainConfig(), id="flag"),
            pytest.param(500, TrainConfig(), TrainConfig(pooled_normaliser_rows=0), id="default-small-table")]


def test_by_default_the_tables_of_at_most_pooled_normaliser_rows_rows_carry_it_and_never_under_dp_or_sgd():
    shapes = {"small": (300, 4), "edge": (1000, 8), "big": (1001, 4)}
    assert TrainConfig().pooled_tables(shapes) == {"small", "edge"}
    assert TrainConfig(pooled_normaliser=True).pooled_tables(shapes) == set(shapes)
    assert TrainConfig(pooled_normaliser_rows=0).pooled_tables(shapes) == set()
    assert TrainConfig(pooled_normaliser_rows=5000).pooled_tables(shapes) == set(shapes)
    # where it does not apply the default carries it nowhere (the flag is refused there, below)
    assert TrainConfig(table_optimizer="sgd").pooled_tables(shapes) == set()
    assert TrainConfig(dp_noise_multiplier=1.0).pooled_tables(shapes) == set()
    assert TrainConfig(dp_sum_noise_multiplier=1.0).pooled_tables(shapes) == set()
    for bad in (-1, 2.5, "many"):
        with pytest.raises(RecipeError, match="pooled_normaliser_rows"):
            TrainConfig(pooled_normaliser_rows=bad)


@pytest.mark.parametrize("rows, on, off", CARRIERS)
def test_plain_and_secure_rounds_under_the_normaliser_end_with_the_same_table_bit_for_bit(tmp_path, direct_transport,
                                                                                           rows, on, off):
    plain, t = _run(tmp_path, direct_transport, "plain", rows, train=on)
    dense, _ = _run(tmp_path, direct_transport, "dense", rows, train=on, secure=True, row_set="dense")
    union, _ = _run(tmp_path, direct_transport, "union", rows, train=on, secure=True, row_set="union")
    without, _ = _run(tmp_path, direct_transport, "without", rows, train=off)
    for c in (plain, dense, union):
        r = c.log.rounds[0]
        assert r["clients"] == 4 and not r["rejected"] and "abandoned" not in r
    assert np.array_equal(plain.tables.tables["ids"], dense.tables.tables["ids"])
    assert np.array_equal(plain.tables.tables["ids"], union.tables.tables["ids"])
    assert not np.array_equal(plain.tables.tables["ids"], without.tables.tables["ids"])  # it did re-scale
    # every plain upload carried its normaliser: twice the table's width
    uploads = [out["update"] for _, kind, out in t.seen if kind == "train" and "update" in out]
    assert len(uploads) == 4
    for record in uploads:
        assert decode_update(record, upload_shapes({"ids": (rows, 4)}, {"ids"}))["ids"].delta.shape[1] == 8


@pytest.mark.parametrize("rows, on, off", CARRIERS)
def test_an_organisation_sending_a_negative_normaliser_in_a_plain_round_is_refused_by_name(tmp_path, direct_transport,
                                                                                            rows, on, off):
    shapes = upload_shapes({"ids": (rows, 4)}, {"ids"})

    def sink(node, content):
        if node == 101 and "update" in content:
            update = decode_update(content["update"], shapes)
            update["ids"].delta[:, 4:] = -4.0  # its normaliser below zero: the others' steps would grow
            content["update"] = encode_update(update, shapes, "float16")
        return content

    t = direct_transport(tmp_path, 4, task=synthetic(4, rows), tamper=sink)
    c = Coordinator(run_config(synthetic(4, rows), rounds=1, train=on), t)
    c.run()
    r = c.log.rounds[0]
    assert "normaliser entries outside [0, 4]" in r["rejected"]["org-1"]
    assert r["clients"] == 3


@pytest.mark.parametrize("rows, on, off", CARRIERS)
def test_a_hostile_organisation_sinking_the_normaliser_inside_a_secure_sum_moves_no_row_beyond_the_bound(
        tmp_path, direct_transport, monkeypatch, rows, on, off):
    """The secure sum cannot show who sent what, and a normaliser of -clip keeps the sum within honest bounds: the
    round completes, the honest steps of the rows it touched grow, and none moves beyond clip x sum w."""
    clip = 0.01
    honest, _ = _run(tmp_path, direct_transport, "honest", rows, train=on, secure=True, row_set="dense", delta_clip=clip)
    orig = ClientSession.mask_group

    def sink(self, vectors):
        if self.name == "org-1" and "values" in vectors:
            q = vectors["values"].view(np.int32).copy()
            m = q.size // 9  # dense: every row, 8 values (4 steps, 4 normalisers) and a weight each
            data, weight = q[: 8 * m].reshape(m, 8), q[8 * m:]
            data[weight != 0, 4:] = -int(np.rint(clip * scale_for(clip, self.n)))
            vectors = {**vectors, "values": q.view(np.uint32)}
        return orig(self, vectors)

    monkeypatch.setattr(ClientSession, "mask_group", sink)
    attacked, _ = _run(tmp_path, direct_transport, "attacked", rows, train=on, secure=True, row_set="dense",
                       delta_clip=clip)
    r = attacked.log.rounds[0]
    assert r["clients"] == 4 and "abandoned" not in r  # nothing in the sum gives it away
    start = type(attacked.tables).initial({"ids": (rows, 4)}, attacked.cfg.seed, attacked.cfg.table_scale).tables["ids"]
    moved = np.abs(attacked.tables.tables["ids"] - start)
    assert np.all(np.isfinite(moved))
    # at most 4 organisations' worth, clip each, times the server step of a table that carries it (half by default)
    assert moved.max() <= attacked.cfg.pooled_server_lr * 4 * clip * (1 + 1e-5)
    assert moved.max() > np.abs(honest.tables.tables["ids"] - start).max()  # the attack did scale steps up


def test_the_squared_gradients_and_steps_of_each_row_are_summed_over_the_epoch_exactly():
    """What an organisation's normaliser is made of: per row, its steps and squared gradients, over 100 steps (past
    the merges of the sparse sums), against a dense count kept by hand."""
    import torch

    from fedembed.train import _GradSquares

    class Tables:
        table_names = ["t"]

        def __init__(self):
            self.emb = torch.nn.Embedding(50, 3, sparse=True)

        def table(self, name):
            return self.emb

    model, rng = Tables(), np.random.default_rng(0)
    squares = _GradSquares(model, model.table_names)
    sq, steps = np.zeros((50, 3)), np.zeros(50)
    for _ in range(100):
        model.emb.zero_grad()
        ids = torch.from_numpy(rng.integers(0, 50, size=6))  # repeats within a step add up to one gradient
        (model.emb(ids) * torch.from_numpy(rng.normal(size=(6, 3))).float()).sum().backward()
        g = model.emb.weight.grad.to_dense().numpy().astype(np.float64)
        touched = np.unique(ids.numpy())
        sq[touched] += g[touched] ** 2
        steps[touched] += 1
        squares.add()
    rows = np.flatnonzero(steps)
    got_sq, got_steps = squares.of("t", rows)
    np.testing.assert_allclose(got_sq, sq[rows], rtol=1e-5)
    np.testing.assert_array_equal(got_steps, steps[rows])
    assert squares.of("t", np.array([], dtype=np.int64))[0].shape == (0, 3)


def test_with_a_small_and_a_large_table_only_the_small_one_carries_it_through_plain_and_secure_rounds(
        tmp_path, direct_transport):
    """Per table: by default the 200-row ``users`` uploads are twice as wide and re-scaled, the 3,000-row ``items``
    are plain deltas, in the same upload and the same secure vector."""
    from pathlib import Path

    spec = TaskSpec(f"{Path(__file__).parent / 'tasks_fixture.py'}:UsersItemsTask", {"orgs": 3})
    runs = {}
    for name, kw in {"plain": {}, "dense": {"secure": True, "row_set": "dense"},
                     "union": {"secure": True, "row_set": "union"},
                     "off": {"train": TrainConfig(pooled_normaliser_rows=0)}}.items():
        t = direct_transport(tmp_path / name, 3, task=spec)
        c = Coordinator(run_config(spec, rounds=1, **kw), t)
        c.run()
        assert c.log.rounds[0]["clients"] == 3 and not c.log.rounds[0]["rejected"], c.log.rounds[0]["rejected"]
        assert c.pooled == (set() if name == "off" else {"users"})
        runs[name] = (c, t)
    plain, t = runs["plain"]
    for record in [out["update"] for _, kind, out in t.seen if kind == "train" and "update" in out]:
        update = decode_update(record, plain.upload_shapes)
        assert update["users"].delta.shape[1] == 8 and update["items"].delta.shape[1] == 4
    for other in ("dense", "union"):  # the secure vectors lay the two widths out alike
        for table in ("users", "items"):
            assert np.array_equal(plain.tables.tables[table], runs[other][0].tables.tables[table])
    off = runs["off"][0]
    assert not np.array_equal(plain.tables.tables["users"], off.tables.tables["users"])  # re-scaled
    assert np.array_equal(plain.tables.tables["items"], off.tables.tables["items"])  # summed as before, bit for bit


def test_a_table_that_carries_it_moves_by_pooled_server_lr_of_its_sum_and_the_others_by_server_lr(
        tmp_path, direct_transport):
    """The default half step of a small table: ``users`` (200 rows, carries the normaliser) moves by
    ``pooled_server_lr`` (0.5) of its normalised sum, ``items`` (3,000 rows) by the whole sum, as before."""
    from pathlib import Path

    from fedembed.config import RunConfig

    assert RunConfig.__dataclass_fields__["pooled_server_lr"].default == 0.5
    spec = TaskSpec(f"{Path(__file__).parent / 'tasks_fixture.py'}:UsersItemsTask", {"orgs": 3})
    moved = {}
    for lr in (0.5, 1.0):  # the same round (same data, seeds, sums): only the step differs
        t = direct_transport(tmp_path / f"lr{lr}", 3, task=spec)
        c = Coordinator(run_config(spec, rounds=1, pooled_server_lr=lr), t)
        start = {n: a.copy() for n, a in c.tables.tables.items()}
        c.run()
        assert c.pooled == {"users"} and c.log.rounds[0]["clients"] == 3
        moved[lr] = {n: c.tables.tables[n].astype(np.float64) - start[n] for n in start}
    assert np.abs(moved[1.0]["users"]).max() > 1e-4  # it moved: the comparison below can fail
    np.testing.assert_allclose(moved[0.5]["users"], 0.5 * moved[1.0]["users"], rtol=1e-4, atol=1e-6)
    assert np.array_equal(moved[0.5]["items"], moved[1.0]["items"])  # a large table: untouched by it


def test_under_an_adaptive_server_step_a_small_table_steps_by_server_lr_not_by_the_share(tmp_path, direct_transport):
    """``pooled_server_lr`` is a share of a sum; under ``adam`` the 200-row ``users`` table takes the
    ``server_lr`` its user chose, like ``items`` (before, it silently took Adam steps of 0.5)."""
    from pathlib import Path

    spec = TaskSpec(f"{Path(__file__).parent / 'tasks_fixture.py'}:UsersItemsTask", {"orgs": 3})
    moved = {}
    for lr, share in ((0.01, 0.5), (0.01, 1.0), (0.02, 0.5)):  # the same round: only the rates differ
        t = direct_transport(tmp_path / f"{lr}-{share}", 3, task=spec)
        c = Coordinator(run_config(spec, rounds=1, server_optimizer="adam", server_lr=lr, pooled_server_lr=share), t)
        start = {n: a.copy() for n, a in c.tables.tables.items()}
        c.run()
        assert c.pooled == {"users"} and c.log.rounds[0]["clients"] == 3
        moved[lr, share] = {n: c.tables.tables[n].astype(np.float64) - start[n] for n in start}
    for table in ("users", "items"):
        assert np.abs(moved[0.01, 0.5][table]).max() > 1e-4  # it moved: the comparisons below can fail
        np.testing.assert_array_equal(moved[0.01, 0.5][table], moved[0.01, 1.0][table])  # the share plays no part
        # the first Adam step is server_lr times the same bias-corrected ratio
        np.testing.assert_allclose(moved[0.02, 0.5][table], 2 * moved[0.01, 0.5][table], rtol=1e-3, atol=1e-6)


def test_the_coordinator_says_which_tables_carry_it_and_why_a_small_one_does_not(tmp_path, direct_transport, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="fedembed.coordinator")
    spec = synthetic(2, rows=500)
    t = direct_transport(tmp_path, 2, task=spec)
    Coordinator(run_config(spec, rounds=1), t)
    assert "table(s) ['ids'] carry the pooled normaliser (at most 1000 rows" in caplog.text
    caplog.clear()
    Coordinator(run_config(spec, rounds=1, train=TrainConfig(table_optimizer="sgd")), t)
    assert ("table(s) ['ids'] are small enough for the pooled normaliser but carry none: it needs the sparse_adam "
            "table optimizer and no DP, got table_optimizer 'sgd'") in caplog.text


# ---------------------------------------------------------------- the organisation's own rule


@pytest.mark.parametrize("rows, on, off", CARRIERS)
def test_an_organisation_that_does_not_upload_its_normaliser_refuses_a_plan_that_asks_and_only_that(
        tmp_path, direct_transport, rows, on, off):
    """The recipe is the coordinator's, so whether a table carries the normaliser is too: an organisation that
    keeps its normaliser to itself (``fedembed client --no-normaliser-upload``) refuses such a round by name, and
    takes part in one that does not ask."""
    for recipe, refused in ((on, True), (off, False)):
        t = direct_transport(tmp_path / str(refused), 4, task=synthetic(4, rows))
        t.orgs[101].normaliser_upload = False
        c = Coordinator(run_config(synthetic(4, rows), rounds=1, train=recipe), t)
        c.run()
        r = c.log.rounds[0]
        if refused:
            assert "upload its Adam normaliser of table(s) ['ids']" in r["rejected"]["org-1"]
            assert r["clients"] == 3
        else:
            assert not r["rejected"] and r["clients"] == 4


def test_the_normaliser_upload_rule_comes_from_the_organisations_own_node_config():
    from fedembed.config import ConfigError
    from fedembed.org import normaliser_upload_rule

    assert normaliser_upload_rule({}) and normaliser_upload_rule({"normaliser-upload": True})
    assert not normaliser_upload_rule({"normaliser-upload": False})  # as Flower parses `normaliser-upload=false`
    assert not normaliser_upload_rule({"normaliser-upload": "false"})
    # what `fedembed client --no-normaliser-upload` writes into the node config, parsed as Flower parses it
    from flwr.common.config import parse_config_args

    from fedembed.cli import build_parser, client_rules

    def written(*flags):
        args = build_parser().parse_args(["client", "--state-dir", "s", "--roster", "r", "--task", "synthetic", *flags])
        return parse_config_args([" ".join(f"{k}={v}" for k, v in client_rules(args).items())])  # as node_config joins

    assert not normaliser_upload_rule(written("--no-normaliser-upload"))
    assert normaliser_upload_rule(written())
    with pytest.raises(ConfigError, match="normaliser-upload"):
        normaliser_upload_rule({"normaliser-upload": "sometimes"})
