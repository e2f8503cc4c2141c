"""Loading tasks: built-in names, import paths, and clear errors."""

import pytest

from pathlib import Path

from fedembed.spec import TableSpec
from fedembed.task import TaskError, TaskSpec, load_task, resolve_task_class

ROOT = Path(__file__).resolve().parents[1]


def test_a_users_task_is_loaded_by_import_path():
    task = load_task(TaskSpec("examples.my_task:ClicksTask", {"org": 1, "orgs": 2, "products": 100}))
    assert task.name == "shop-1"
    assert task.table_specs() == {"products": TableSpec(rows=100, dim=16)}
    model = task.build_model()
    assert model.table_names == ["products"]


def test_a_users_task_is_loaded_by_file_path(tmp_path):
    path = tmp_path / "clicks.py"
    path.write_text((ROOT / "examples" / "my_task.py").read_text())
    task = load_task(TaskSpec(f"{path}:ClicksTask", {"products": 50}))
    assert task.table_specs()["products"].rows == 50
    with pytest.raises(TaskError, match="not found"):
        resolve_task_class(f"{tmp_path / 'nope.py'}:ClicksTask")


@pytest.mark.parametrize(
    "name, fault",
    [
        ("nosuch", "unknown task"),
        ("nosuch_module_xyz:Task", "cannot import"),
        ("examples.my_task:Nope", "no attribute"),
        ("examples.my_task:Net", "not a subclass"),
    ],
)
def test_bad_task_names_say_what_is_wrong(name, fault):
    with pytest.raises(TaskError, match=fault):
        resolve_task_class(name)


def test_unknown_task_options_are_reported_with_the_options_it_takes():
    with pytest.raises(TaskError, match=r"takes no option 'colour'.*products"):
        load_task(TaskSpec("examples.my_task:ClicksTask", {"orgs": 2, "colour": "red"}))
    with pytest.raises(TaskError, match="takes no option 'rows'"):  # a synthetic option given to movies
        load_task(TaskSpec("movies", {"rows": 20000}))


def test_a_simulation_gives_org_and_orgs_only_to_a_task_that_takes_them():
    assert TaskSpec("movies", {"scenario": "mixed"}).for_org(1, 3).options == {"scenario": "mixed", "org": 1, "orgs": 3}
    assert TaskSpec(f"{ROOT / 'tests' / 'tasks_fixture.py'}:NoOrgTask").for_org(1, 3).options == {}


def test_task_spec_round_trips_through_json():
    spec = TaskSpec("movies", {"orgs": 5, "seed": 1})
    assert TaskSpec.from_json(spec.to_json()) == spec
