"""A real Flower simulation (Ray) driven by the `fedembed simulate` command."""

import json

import numpy as np
import pytest

from fedembed.cli import main
from fedembed.task import TaskSpec, load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def movies_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    code = main(["simulate", "--task", "movies", "--orgs", "3", "--rounds", "2", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_simulation_writes_the_three_outputs_with_the_documented_schema(movies_run):
    doc = json.loads((movies_run / "metrics.json").read_text())
    assert doc["config"]["mode"] == "fedembed"
    # the coordinator knows no task, only the federation spec: the movies model's tables, people vocabulary included
    movies = load_task(TaskSpec("movies", {"org": 0, "orgs": 3})).federation_spec()
    assert doc["config"]["federation"] == movies.to_dict() and movies.tables["ids"].vocabulary
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        for key in ("clients", "upload_bytes", "download_bytes", "dense_upload_bytes", "wall_seconds", "metrics"):
            assert key in r
        assert r["clients"] == 3 and not r["rejected"]
        assert 0 < r["upload_bytes"] < r["dense_upload_bytes"]
        assert set(r["metrics"]) == {"United States", "France", "United Kingdom"}
    final = doc["final"]
    assert set(final) == {"United States", "France", "United Kingdom", "mean"}
    assert 0 < final["mean"]["score"] <= 1
    assert (movies_run / "report.png").stat().st_size > 10_000


def test_embeddings_file_holds_the_coordinators_final_table(movies_run):
    with np.load(movies_run / "embeddings.npz") as z:
        assert z.files == ["ids"]
        table = z["ids"]
    # 63,815 people (the movies people vocabulary) + its out-of-vocabulary row
    assert table.shape == (63815 + 1, 32) and np.all(np.isfinite(table))
    # every organisation's cache was synced to exactly this table by the closing evaluation, on every row it
    # holds fresh; those cover every row its data looks up (its working set: all it syncs in plain rounds)
    from fedembed.store import OrgState
    from fedembed.workingset import RowState, working_set

    shapes = {"ids": table.shape}
    orgs = sorted((movies_run / "state" / "orgs").iterdir())
    assert len(orgs) == 3
    for org in orgs:
        cache, version = OrgState(org).load_cached_tables(shapes)
        key = json.loads((org / "tables.json").read_text())["key"]
        fresh = RowState.load(org, shapes, version, key).fresh_mask("ids")
        assert version == 2 and np.array_equal(cache["ids"][fresh], table[fresh])
        i = int(org.name.rpartition("-")[2])
        assert fresh[working_set(load_task(TaskSpec("movies", {"org": i, "orgs": 3})), shapes)["ids"]].all()


def test_heads_persist_in_each_organisations_state_dir(movies_run):
    heads = sorted((movies_run / "state" / "orgs").glob("org-*/head.pt"))
    assert len(heads) == 3


def test_bad_command_line_input_gets_a_clear_error(tmp_path, capsys):
    assert main(["simulate", "--task", "movies", "--option", "rows=10", "--out", str(tmp_path)]) == 2  # not a movies option
    assert main(["simulate", "--task", "nosuch", "--orgs", "2", "--rounds", "1", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["simulate", "--orgs", "0"])


def test_a_secure_simulation_of_two_organisations_is_refused_before_it_starts(tmp_path, caplog):
    """Each organisation masks with at least 2 neighbours: with 2 organisations every round was abandoned at its
    share stage, and the run ended with exit 0 and a metrics.json of untrained tables."""
    code = main(["simulate", "--orgs", "2", "--rounds", "1", "--secure", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "secure aggregation needs at least 3 organisations, got 2" in caplog.text
    assert not (tmp_path / "out" / "metrics.json").exists()
