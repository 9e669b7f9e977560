"""Tasks: importing this package registers every task module in ``TASKS``."""

from gem_bench.tasks.base import TASKS, Example, Task, continuation, register_task

# One line per task module; importing it runs its @register_task decorators.
from gem_bench.tasks import classification, generation  # noqa: F401

__all__ = ["TASKS", "Example", "Task", "continuation", "register_task"]
