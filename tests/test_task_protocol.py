"""The task protocol's promise: nothing outside src/dlpipe/tasks/ branches on the name of a task, and the
pipeline asks the task instead. A registry declaration (`register_model("cnn", task="classifier")`) is
not a branch; a comparison or a lookup table keyed by a task name is."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO_ROOT
from dlpipe.tasks import get_task, list_tasks

CHECKED = [*sorted((REPO_ROOT / "src" / "dlpipe").rglob("*.py")), *sorted((REPO_ROOT / "pipelines").rglob("*.py"))]
CHECKED += sorted((REPO_ROOT / "benchmarks").rglob("*.py"))


def task_name_uses(path, names: set[str]) -> list[str]:
    """Lines where a task name appears as a string literal, other than as `register_model(..., task=...)`."""
    tree = ast.parse(path.read_text())
    allowed = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "register_model"
        ):
            allowed.update(id(k.value) for k in node.keywords if k.arg == "task")
    return [
        f"{path.name}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in allowed
    ]


def test_no_task_name_outside_the_tasks_package():
    names = set(list_tasks())
    offenders = [
        line
        for path in CHECKED
        if "tasks" not in path.relative_to(REPO_ROOT).parts
        for line in task_name_uses(path, names)
    ]
    assert offenders == []


def test_the_check_catches_a_branch(tmp_path):
    (tmp_path / "stage.py").write_text('def pick(task):\n    return 1 if task == "forecaster" else 2\n')
    offending = task_name_uses(tmp_path / "stage.py", set(list_tasks()))
    assert len(offending) == 1 and re.search(r":2: 'forecaster'", offending[0])


@pytest.mark.parametrize("name", list_tasks())
def test_each_task_declares_what_the_pipeline_asks(name):
    task = get_task(name)
    assert task.name == name
    metric, mode = task.monitor
    assert metric and mode in ("min", "max")
    key, higher_is_better = task.promotion
    assert key in task.metric_keys and isinstance(higher_is_better, bool)
    assert task.params_type.model_fields["task"].annotation.__args__ == (name,)  # Literal[name]: the union's tag
    assert set(task.data_kwargs) == set(task.example_data_kwargs())
