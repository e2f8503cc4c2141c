"""Loading tasks: built-in names, import paths, and clear errors."""

import pytest

from fedembed.task import TaskError, TaskSpec, load_task, resolve_task_class


def test_a_users_task_is_loaded_by_import_path():
    task = load_task(TaskSpec("examples.my_task:ClicksTask", {"orgs": 2, "products": 100}))
    assert task.org_names() == ["shop-0", "shop-1"]
    assert task.table_shapes() == {"products": (100, 16)}
    model = task.build_model(0)
    assert model.table_names == ["products"]


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


def test_unknown_task_options_are_reported():
    with pytest.raises(TaskError, match="rejected its options"):
        load_task(TaskSpec("examples.my_task:ClicksTask", {"orgs": 2, "colour": "red"}))


def test_task_spec_round_trips_through_json():
    spec = TaskSpec("movies", {"orgs": 5, "seed": 1})
    assert TaskSpec.from_json(spec.to_json()) == spec
