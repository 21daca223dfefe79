"""Tasks: data and models. Importing this package registers every built-in task and model."""

from tasks import arithmetic as _arithmetic  # noqa: F401  (registers modular_arithmetic)
from tasks.base import MODELS, TASKS, Split, StageData, Task, parse_block, register_model, register_task
from tasks.models import gpt as _gpt  # noqa: F401  (registers gpt)

__all__ = ["MODELS", "TASKS", "Split", "StageData", "Task", "parse_block", "register_model", "register_task"]
