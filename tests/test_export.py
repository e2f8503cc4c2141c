"""Export: an organisation's trained plain module, and the coordinator's final tables with their vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DirectTransport, run_config
from examples.baskets.make_data import make_data
from fedembed.config import RunConfig
from fedembed.coordinator import Coordinator
from fedembed.export import ExportError, export_coordinator, export_organisation
from fedembed.recipe import TrainConfig
from fedembed.spec import FederationSpec
from fedembed.store import OrgState
from fedembed.task import TaskSpec, load_task
from fedembed.vocab import Vocabulary

CLICKS = TaskSpec("examples.my_task:ClicksTask", {"orgs": 3, "products": 400})


def clicks_run(tmp_path, **train):
    """A 2-round in-process run ending with the closing evaluation; returns (coordinator, transport)."""
    t = DirectTransport(tmp_path, 3, task=CLICKS)
    c = Coordinator(run_config(CLICKS, rounds=2, train=TrainConfig(**train)), t, state_dir=tmp_path / "coord")
    c.run()
    return c, t


def exported_module(tmp_path, t, node: int):
    """Organisation ``node``'s export, loaded strictly into a fresh plain module of its own task."""
    org = t.orgs[node]
    out = tmp_path / f"{org.identity.name}.pt"
    written = export_organisation(org.state.dir, org.task_spec, out)
    assert written == [out, out.with_name(out.name + ".json")]
    task = load_task(org.task_spec)
    module = task.build_model().module
    module.load_state_dict(torch.load(out, weights_only=True))  # strict: every key, no extra
    return task, module.eval()


def test_exported_model_scores_what_the_closing_evaluation_reported(tmp_path):
    c, t = clicks_run(tmp_path)
    final = c.log.final()
    for node, org in t.orgs.items():
        task, module = exported_module(tmp_path, t, node)
        assert task.evaluate(module, "test")["score"] == pytest.approx(final[org.identity.name]["score"], abs=1e-6)
        assert task.evaluate(module, "val")["score"] == pytest.approx(final[org.identity.name]["val_score"], abs=1e-6)
        # the tables in it are the coordinator's final ones
        np.testing.assert_array_equal(module.products.weight.detach().numpy(), c.tables.tables["products"])


def test_export_best_gives_the_served_state_an_organisation_chose_to_keep_itself(tmp_path):
    """The organisations keep their served state by their own choice (node config ``keep-best-state``, the recipe
    leaves it off); ``export --best`` gives a model scoring each one's served (best-validation) test score, the
    default export its last. Organisation 2 kept nothing: ``--best`` says so."""
    t = DirectTransport(tmp_path, 3, task=CLICKS)
    t.orgs[100].keep_best = t.orgs[101].keep_best = True
    c = Coordinator(run_config(CLICKS, rounds=4), t, state_dir=tmp_path / "coord")
    assert not c.cfg.train.keep_best_state
    c.run()
    final = c.log.final()
    served_earlier = 0
    for node in (100, 101):
        org = t.orgs[node]
        name, task = org.identity.name, load_task(org.task_spec)
        scores = {}
        for best in (True, False):
            out = tmp_path / f"{name}-{best}.pt"
            export_organisation(org.state.dir, org.task_spec, out, best=best)
            module = task.build_model().module
            module.load_state_dict(torch.load(out, weights_only=True))
            scores[best] = task.evaluate(module.eval(), "test")["score"]
        assert scores[True] == pytest.approx(final[name]["best_score"], abs=1e-6)
        assert scores[False] == pytest.approx(final[name]["score"], abs=1e-6)
        served_earlier += final[name]["best_round"] < 4
    assert served_earlier  # an organisation served an earlier round: the two exports differ, the check can fail
    with pytest.raises(ExportError, match="holds no served state: keep one with `fedembed client --keep-best-state`"):
        export_organisation(t.orgs[102].state.dir, t.orgs[102].task_spec, tmp_path / "none.pt", best=True)
    # a later run in the same state directory that keeps nothing: the kept state is the earlier run's, refused
    org = t.orgs[100]
    org.keep_best = False
    Coordinator(run_config(CLICKS, rounds=1, seed=7), t, state_dir=tmp_path / "coord2").run()
    with pytest.raises(ExportError, match="holds the served state of another run"):
        export_organisation(org.state.dir, org.task_spec, tmp_path / "stale.pt", best=True)


def test_a_residual_is_folded_into_the_table_and_predicts_as_the_residual_model(tmp_path):
    c, t = clicks_run(tmp_path, residual=True)
    final = c.log.final()
    for node, org in t.orgs.items():
        task, plain = exported_module(tmp_path, t, node)
        # the organisation's own residual model, rebuilt from its state dir
        saved = torch.load(org.state.dir / "head.pt", weights_only=True)["head"]
        residual = saved["products.residual.weight"]
        assert residual.abs().sum() > 0  # it trained: the fold has something to fold
        model = task.build_model()
        model.add_residuals()
        tables, version = OrgState(org.state.dir).load_cached_tables(c.shapes)
        assert version == 2
        model.set_tables(tables)
        model.load_head_state_dict(saved)
        model.eval()
        np.testing.assert_allclose(plain.products.weight.detach().numpy(), tables["products"] + residual.numpy(),
                                   rtol=0, atol=1e-6)
        with torch.no_grad():
            for x, _ in task.batches("test", 10**6, None):
                np.testing.assert_allclose(plain(x).numpy(), model(x).numpy(), rtol=0, atol=1e-5)
        assert task.evaluate(plain, "test")["score"] == pytest.approx(final[org.identity.name]["score"], abs=1e-6)


def test_nothing_to_export_before_an_organisation_took_part(tmp_path):
    with pytest.raises(ExportError, match="no trained tables"):
        export_organisation(tmp_path / "new-org", CLICKS.for_org(0, 3), tmp_path / "m.pt")


# ------------------------------------------------------------------ the coordinator's tables


@pytest.fixture
def baskets_run(tmp_path):
    """A 1-round run of the baskets federation (a table keyed by a vocabulary file), checkpointed."""
    d = make_data(tmp_path / "data", orgs=2, baskets=100)
    task = TaskSpec("examples.baskets.task:BasketsTask", {"vocabulary": str(d["vocabulary"])}, str(d["orgs"][0]))
    fed = FederationSpec.load(d["federation"])
    c = Coordinator(RunConfig(federation=fed, rounds=1), DirectTransport(tmp_path / "orgs", 2, task=task),
                    state_dir=tmp_path / "coord")
    c.run()
    return c, d, fed


def test_export_coordinator_writes_the_final_tables_and_the_checked_vocabulary(tmp_path, baskets_run):
    c, d, fed = baskets_run
    out = tmp_path / "export" / "tables.npz"
    written = export_coordinator(tmp_path / "coord", out, fed, d["federation"])
    vocab_copy = tmp_path / "export" / "tables.skus.vocab.txt"
    assert written == [out, vocab_copy]
    with np.load(out) as z:
        assert z.files == ["skus"]
        np.testing.assert_array_equal(z["skus"], c.tables.tables["skus"])
    assert vocab_copy.read_bytes() == d["vocabulary"].read_bytes()
    assert Vocabulary.load(vocab_copy).digest == fed.tables["skus"].vocabulary
    # without the federation spec: the tables only
    assert export_coordinator(tmp_path / "coord", tmp_path / "bare" / "t.npz") == [tmp_path / "bare" / "t.npz"]


@pytest.mark.parametrize("tamper", ["one SKU more", "two SKUs swapped"])
def test_export_coordinator_refuses_a_vocabulary_file_whose_digest_is_not_the_federations(tmp_path, baskets_run, tamper):
    c, d, fed = baskets_run
    ids = Vocabulary.load(d["vocabulary"]).ids()
    ids = ids + ["SKU-XTRA1"] if tamper == "one SKU more" else [ids[1], ids[0], *ids[2:]]
    Vocabulary.from_ids(ids).write(d["vocabulary"])  # the file beside the spec changed after it was published
    out = tmp_path / "export" / "tables.npz"
    with pytest.raises(ExportError, match=r"skus.txt: digest sha256:\w+ is not table 'skus''s in the federation spec"):
        export_coordinator(tmp_path / "coord", out, fed, d["federation"])
    assert not (tmp_path / "export" / "tables.skus.vocab.txt").exists()  # the wrong vocabulary is not copied


def test_export_coordinator_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="no coordinator checkpoint"):
        export_coordinator(tmp_path, tmp_path / "t.npz")


# ------------------------------------------------------------------ known bugs in fedembed/export.py (see the reasons)


def test_export_coordinator_refuses_the_spec_of_another_federation(tmp_path, baskets_run):
    other = make_data(tmp_path / "other", orgs=2, baskets=100, seed=1)  # another vocabulary, its own spec
    with pytest.raises(ExportError):
        export_coordinator(tmp_path / "coord", tmp_path / "export" / "tables.npz",
                           FederationSpec.load(other["federation"]), other["federation"])


HEAD_NAMED_RESIDUAL = '''
import numpy as np, torch
from torch import nn
from fedembed import SplitModel, Task

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.items = nn.Embedding(50, 4)
        self.block = nn.Module()
        self.block.residual = nn.Linear(4, 1)  # a head layer that happens to be called "residual"

    def forward(self, x):
        return self.block.residual(self.items(x).mean(1)).squeeze(1)

class ResidualNamedTask(Task):
    def build_model(self):
        return SplitModel(Net(), tables=["items"])
    def num_examples(self, split):
        return 32
    def batches(self, split, batch_size, rng):
        g = np.random.default_rng(1)
        yield torch.from_numpy(g.integers(0, 50, (32, 3))), torch.from_numpy((g.random(32) < .5).astype(np.float32))
    def loss(self, model, b):
        return nn.functional.binary_cross_entropy_with_logits(model(b[0]), b[1])
    @torch.no_grad()
    def evaluate(self, model, split):
        x, y = next(self.batches(split, 32, None))
        return {"score": float(((model(x) > 0).float() == y).float().mean())}
'''


def test_exporting_a_head_with_a_layer_named_residual_works_and_leaves_the_state_alone(tmp_path):
    path = tmp_path / "named.py"
    path.write_text(HEAD_NAMED_RESIDUAL)
    spec = TaskSpec(f"{path}:ResidualNamedTask")
    t = DirectTransport(tmp_path / "orgs", 1, task=spec)
    Coordinator(RunConfig(federation=load_task(spec).federation_spec(), rounds=1), t).run()
    state = t.orgs[100].state.dir
    try:
        export_organisation(state, spec, tmp_path / "m.pt")
    finally:
        assert (state / "head.pt").exists(), sorted(p.name for p in state.iterdir())


def test_keeping_the_served_state_is_the_organisations_own_flag():
    """`fedembed client --keep-best-state` reaches its node config as Flower parses it; absent, nothing is kept."""
    from flwr.common.config import parse_config_args

    from fedembed.cli import build_parser, client_rules
    from fedembed.config import ConfigError
    from fedembed.org import node_flag

    def written(*flags):
        args = build_parser().parse_args(["client", "--state-dir", "s", "--roster", "r", "--task", "synthetic", *flags])
        return parse_config_args([" ".join(f"{k}={v}" for k, v in client_rules(args).items())])

    assert node_flag(written("--keep-best-state"), "keep-best-state", False)
    assert not node_flag(written(), "keep-best-state", False)
    assert not node_flag({}, "keep-best-state", False)
    with pytest.raises(ConfigError, match="keep-best-state must be true or false"):
        node_flag({"keep-best-state": "often"}, "keep-best-state", False)
