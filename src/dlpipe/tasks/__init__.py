"""Tasks: one per kind of model, registered by name (see `base.Task`). Importing this package registers
every task module, so `list_tasks()` is complete."""

# Importing the task modules registers them.
from dlpipe.tasks import classifier, forecaster, generator  # noqa: E402,F401,I001
from dlpipe.tasks.base import EXPORTED_PREFIX, Task, get_task, list_tasks, register_task, task_of, train_params_types

__all__ = ["EXPORTED_PREFIX", "Task", "get_task", "list_tasks", "register_task", "task_of", "train_params_types"]
