"""Record-level, row-sparse DP inside an organisation: per-example clipping, noise, row selection, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedembed.dp import DPError
from fedembed.dp.accounting import PrivacyLedger
from fedembed.dp.clipping import ExampleGradients
from fedembed.dp.local import DPConfig, RowSparseDPSGD, dp_epochs
from fedembed.dp.selection import select_rows, tail_probability
from fedembed.model import SplitModel
from fedembed.task import SyntheticTask


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(orgs=2, rows=2000, examples=300, dim=8, hidden=16)


def _dense_grads(model: SplitModel) -> list[torch.Tensor]:
    """Every parameter's gradient, dense (zeros where none): tables first, then the head."""
    out = []
    for p in model.table_parameters() + model.head_parameters():
        g = p.grad
        out.append(torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g).clone())
    return out


def _brute_force(model: SplitModel, example_loss) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Per-example gradients the slow way: one backward pass per example, dense tables."""
    norms, grads = [], []
    i = 0
    while True:
        loss = example_loss(i)
        if loss is None:
            break
        model.zero_grad(set_to_none=True)
        loss.backward()
        g = _dense_grads(model)
        grads.append(g)
        norms.append(math.sqrt(sum(float(x.double().pow(2).sum()) for x in g)))
        i += 1
    model.zero_grad(set_to_none=True)
    return torch.tensor(norms, dtype=torch.float64), grads


def _clipped_dense(model: SplitModel, clipped) -> list[torch.Tensor]:
    out = []
    for name in model.table_names:
        w = model.table(name).weight
        d = torch.zeros_like(w)
        tg = clipped.tables.get(name)
        if tg is not None:
            d[tg.rows] = tg.clipped_sum
        out.append(d)
    return out + [h.detach() for h in clipped.head]


def _check_against_brute_force(model, losses_of_batch, example_loss, clip):
    with ExampleGradients(model) as eg:
        clipped = eg.clip(losses_of_batch(), clip)
    norms, grads = _brute_force(model, example_loss)
    np.testing.assert_allclose(clipped.norms.numpy(), norms.numpy(), rtol=1e-5)
    scale = torch.clamp(clip / norms, max=1.0)
    expected = [sum(float(scale[b]) * grads[b][k] for b in range(len(grads))) for k in range(len(grads[0]))]
    for got, want in zip(_clipped_dense(model, clipped), expected):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-6)
    return clipped


def test_per_example_norms_and_clipped_sums_equal_brute_force_gradients_embedding_bag(task):
    model = task.build_model()
    idx = np.arange(7)
    _check_against_brute_force(
        model,
        lambda: task.example_losses(model, task.batch_of("train", idx)),
        lambda i: task.example_losses(model, task.batch_of("train", idx[i:i + 1])).sum() if i < len(idx) else None,
        clip=0.05,  # below most norms: the clip factors matter
    )


class _SeqModel(nn.Module):
    """nn.Embedding over (B, L) ids with a padding row and repeats; a head with a per-position linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4, padding_idx=0)
        self.pos = nn.Linear(4, 3)
        self.out = nn.Linear(3 * 5, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.pos(self.emb(ids))).flatten(1)).squeeze(1)


def test_per_example_norms_and_clipped_sums_equal_brute_force_gradients_embedding_with_padding_and_repeats():
    torch.manual_seed(0)
    model = SplitModel(_SeqModel(), tables=["emb"])
    ids = torch.tensor([[1, 2, 2, 0, 0], [3, 3, 3, 3, 4], [0, 0, 0, 0, 0], [5, 6, 7, 8, 1]])
    y = torch.tensor([1.0, -2.0, 0.5, 3.0])
    clipped = _check_against_brute_force(
        model,
        lambda: (model(ids) - y) ** 2,
        lambda i: ((model(ids[i:i + 1]) - y[i:i + 1]) ** 2).sum() if i < len(ids) else None,
        clip=0.3,
    )
    assert 0 not in clipped.tables["emb"].rows.tolist()  # the padding row has no gradient, and no pair


def test_a_huge_gradient_example_contributes_at_most_the_clip_norm(task):
    model = task.build_model()
    clip = 0.5
    idx = np.arange(8)
    boost = torch.ones(8)
    boost[0] = 1e6  # example 0's loss (and so its gradient) a million times larger

    def clipped_sum(rows):
        with ExampleGradients(model) as eg:
            losses = task.example_losses(model, task.batch_of("train", idx[rows])) * boost[rows]
            return eg.clip(losses, clip)

    with_it, without_it = clipped_sum(np.arange(8)), clipped_sum(np.arange(1, 8))
    assert float(with_it.norms[0]) > 1e3 * clip  # it really is huge
    diff = [a - b for a, b in zip(_clipped_dense(model, with_it), _clipped_dense(model, without_it))]
    contribution = math.sqrt(sum(float(d.double().pow(2).sum()) for d in diff))
    assert contribution <= clip * (1 + 1e-5)
    assert contribution == pytest.approx(clip, rel=1e-4)  # clipped, not dropped


def test_noise_std_matches_multiplier_times_clip(task):
    """The released gradient minus the clipped sum is the noise: its empirical std must be
    noise_multiplier x clip, within 5 standard errors of a sample std (std / sqrt(2 (n - 1)))."""
    model = task.build_model()
    cfg = DPConfig(noise_multiplier=0.7, clip=2.5, selection_noise_multiplier=1.0, row_threshold=0.5)
    batch = task.batch_of("train", np.arange(16))
    with ExampleGradients(model) as eg:
        clean = _clipped_dense(model, eg.clip(task.example_losses(model, batch), cfg.clip))
    denominator = 3.0
    report = RowSparseDPSGD(model, cfg, np.random.default_rng(1)).step(task, batch, denominator)
    released = _dense_grads(model)
    noise = []
    for name, got, want in zip(model.table_names, released, clean):
        rows = torch.from_numpy(report.selected[name])
        noise.append((got[rows] * denominator - want[rows]).reshape(-1))
    for got, want in zip(released[len(model.table_names):], clean[len(model.table_names):]):
        noise.append((got * denominator - want).reshape(-1))
    noise = torch.cat(noise).double()
    n, target = noise.numel(), cfg.noise_multiplier * cfg.clip
    assert n > 2000
    assert float(noise.std()) == pytest.approx(target, abs=5 * target / math.sqrt(2 * (n - 1)))
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(n)


def test_unselected_rows_never_get_a_gradient_and_never_move(task):
    model = task.build_model()
    before = model.get_tables()["ids"]
    cfg = DPConfig(noise_multiplier=1.0, clip=1.0, selection_noise_multiplier=0.5, row_threshold=1.5, count_clip=3.0)
    batch = task.batch_of("train", np.arange(32))
    touched = np.unique(batch.ids.numpy())
    opt = torch.optim.SparseAdam(model.table_parameters(), lr=0.1)
    report = RowSparseDPSGD(model, cfg, np.random.default_rng(2)).step(task, batch, 32.0)
    selected = report.selected["ids"]
    grad = model.table("ids").weight.grad
    assert grad.is_sparse and sorted(grad.coalesce().indices()[0].tolist()) == selected.tolist()
    dropped = np.setdiff1d(touched, selected)
    assert dropped.size > 0 and np.intersect1d(touched, selected).size > 0  # the test means something
    opt.step()
    after = model.get_tables()["ids"]
    moved = np.flatnonzero(np.any(after != before, axis=1))
    assert set(moved.tolist()) <= set(selected.tolist())
    np.testing.assert_array_equal(after[dropped], before[dropped])


def test_a_dp_round_uploads_only_rows_some_step_selected(task):
    model = task.build_model()
    start = model.get_tables()
    cfg = DPConfig(noise_multiplier=1.0, clip=1.0, selection_noise_multiplier=0.5, row_threshold=5.0, count_clip=3.0)
    opts = [torch.optim.SparseAdam(model.table_parameters(), lr=0.05), torch.optim.AdamW(model.head_parameters(), lr=0.01)]
    lookups: dict[str, list[np.ndarray]] = {}
    dp_epochs(task, model, cfg, 16, 1, opts, np.random.default_rng(3), lookups)
    selected = np.unique(np.concatenate(lookups["ids"]))
    now = model.get_tables()["ids"]
    moved = np.flatnonzero(np.any(now != start["ids"], axis=1))
    assert set(moved.tolist()) <= set(selected.tolist())  # what train_local turns into the upload
    looked_up = np.unique(np.concatenate([task.batch_of("train", np.arange(task.num_examples("train"))).ids.numpy()]))
    never = np.setdiff1d(looked_up, selected)
    assert never.size > 0 and selected.size > 0  # the test means something
    np.testing.assert_array_equal(now[never], start["ids"][never])


def test_selection_is_distributed_as_dense_noise_then_threshold():
    rng = np.random.default_rng(4)
    rows, std, tau, trials = 5000, 1.0, 2.0, 300
    touched = np.arange(0, 100, 2, dtype=np.int64)  # 50 rows with counts 0.5, 1, ..., 3 (cycled)
    counts = 0.5 * (1 + np.arange(50) % 6)
    hits_touched = np.zeros(50)
    fp, fp_values = [], []
    for _ in range(trials):
        ids, values = select_rows(touched, counts, rows, std, tau, rng, exclude=1)
        assert np.all(np.diff(ids) > 0) and np.all(values >= tau) and 1 not in ids
        hits_touched += np.isin(touched, ids)
        extra = ~np.isin(ids, touched)
        fp.append(int(extra.sum()))
        fp_values.extend(values[extra].tolist())
    untouched = rows - 50 - 1
    p = tail_probability(tau, std)
    mean, sd = untouched * p, math.sqrt(untouched * p * (1 - p) / trials)
    assert np.mean(fp) == pytest.approx(mean, abs=5 * sd)
    want = np.array([tail_probability(tau - c, std) for c in counts])
    assert np.all(np.abs(hits_touched / trials - want) <= 5 * np.sqrt(want * (1 - want) / trials) + 1e-9)
    # false positives' noisy counts: N(0, 1) conditioned on >= tau, mean phi(tau) / Q(tau)
    trunc_mean = math.exp(-tau**2 / 2) / math.sqrt(2 * math.pi) / p
    assert np.mean(fp_values) == pytest.approx(trunc_mean, abs=5 * 0.4 / math.sqrt(len(fp_values)))


def test_ledger_epsilon_of_a_dp_round_matches_an_independent_computation(task):
    from test_dp_accounting import _cks_epsilon, _independent_rdp

    model = task.build_model()
    cfg = DPConfig(noise_multiplier=1.2, clip=1.0, selection_noise_multiplier=3.0, row_threshold=6.0, count_clip=2.0)
    opts = [torch.optim.SparseAdam(model.table_parameters(), lr=0.05), torch.optim.AdamW(model.head_parameters(), lr=0.01)]
    ledger = PrivacyLedger(target_delta=1e-5, method="rdp")
    for _ in range(2):  # two rounds, recorded as they ran
        _, _, r = dp_epochs(task, model, cfg, 16, 1, opts, np.random.default_rng(5), {})
        ledger.record(r)
    n = task.num_examples("train")
    sigma = (1.2**-2 + 3.0**-2) ** -0.5  # gradient and count mechanisms on one sample
    q, steps = 16 / n, 2 * math.ceil(n / 16)
    r = ledger.rounds[0]
    assert (r.noise_multiplier, r.sampling_rate, r.steps, r.population) == (pytest.approx(sigma), pytest.approx(q), steps // 2, n)
    independent = min(_cks_epsilon(_independent_rdp(q, sigma, steps, a), a, 1e-5) for a in range(2, 257))
    assert ledger.epsilon() <= independent + 1e-9
    assert ledger.epsilon() == pytest.approx(independent, rel=0.03)


def test_models_the_dp_path_cannot_make_private_are_refused():
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.EmbeddingBag(10, 4, mode="mean")
            self.norm = nn.LayerNorm(4)

        def forward(self, ids, offsets):
            return self.norm(self.emb(ids, offsets))

    with pytest.raises(DPError, match="nn.Linear"):
        ExampleGradients(SplitModel(Normed(), tables=["emb"]))
    bn = SplitModel(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.BatchNorm1d(8)), tables={"t": "0"})
    with pytest.raises(DPError, match="mixes the examples"):
        ExampleGradients(bn)
    maxbag = SplitModel(nn.Sequential(nn.EmbeddingBag(10, 4, mode="max"), nn.Linear(4, 1)), tables={"t": "0"})
    with pytest.raises(DPError, match="mode 'max'"):
        ExampleGradients(maxbag)


# ------------------------------------------------------------------ user-level: a user with all their records
def test_per_user_norms_and_clipped_sums_equal_brute_force_gradients_of_each_users_summed_loss(task):
    """With privacy units, a unit's gradient is the gradient of its records' summed loss, clipped as one."""
    model = task.build_model()
    idx = np.arange(9)
    units = np.array([0, 1, 0, 2, 1, 0, 3, 2, 0])  # 4 users, 1 to 4 records each
    with ExampleGradients(model) as eg:
        clipped = eg.clip(task.example_losses(model, task.batch_of("train", idx)), 0.05, torch.from_numpy(units))

    def user_loss(u):
        if u > units.max():
            return None
        return task.example_losses(model, task.batch_of("train", idx[units == u])).sum()

    norms, grads = _brute_force(model, user_loss)
    np.testing.assert_allclose(clipped.norms.numpy(), norms.numpy(), rtol=1e-5)
    scale = torch.clamp(0.05 / norms, max=1.0)
    expected = [sum(float(scale[u]) * grads[u][k] for u in range(len(grads))) for k in range(len(grads[0]))]
    for got, want in zip(_clipped_dense(model, clipped), expected):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-6)


def test_a_user_with_many_huge_gradient_records_contributes_at_most_the_clip_norm_in_all(task):
    """Record-level clipping bounds each record: a user with 8 records moves the sum by up to 8 clips (here by
    well over one). User-level bounds the user: all 8 records together move it by one clip at most."""
    model = task.build_model()
    idx = np.arange(8)
    totals = {}
    for unit, units in (("record", None), ("user", torch.zeros(8, dtype=torch.long))):
        with ExampleGradients(model) as eg:
            clipped = eg.clip(1e4 * task.example_losses(model, task.batch_of("train", idx)), 1.0, units)
        totals[unit] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in _clipped_dense(model, clipped)))
    assert 1.5 < totals["record"] <= 8.0 + 1e-6
    assert totals["user"] == pytest.approx(1.0, rel=1e-5)  # clipped to the bound, not beyond, not dropped


def test_user_level_steps_sample_whole_users_and_account_users_as_the_population():
    t = SyntheticTask(orgs=2, rows=2000, examples=300, dim=8, hidden=16, users=20)
    units = t.privacy_units("train")
    seen: list[np.ndarray] = []
    batch_of = t.batch_of

    def recording(split, idx):
        seen.append(np.asarray(idx))
        return batch_of(split, idx)

    t.batch_of = recording  # type: ignore[method-assign]
    model = t.build_model()
    opts = [torch.optim.SGD(model.head_parameters(), lr=0.01)]
    cfg = DPConfig(1.0, 1.0, 1.0, 4.0, unit="user")
    _, _, ran = dp_epochs(t, model, cfg, 32, 1, opts, np.random.default_rng(0), {})
    assert ran.population == 20 and ran.sampling_rate == pytest.approx(32 / t.num_examples("train"))
    assert seen and all(np.array_equal(np.sort(idx), np.flatnonzero(np.isin(units, units[idx]))) for idx in seen)


def test_user_level_dp_needs_the_task_to_say_which_records_belong_together(task):
    model = task.build_model()
    with pytest.raises(DPError, match="privacy_units"):
        dp_epochs(task, model, DPConfig(1.0, 1.0, 1.0, 4.0, unit="user"), 32, 1, [], np.random.default_rng(0), {})
