"""Tasks: data and models. Importing this package registers every built-in task and model."""

from tasks import arithmetic as _arithmetic  # noqa: F401  (registers modular_arithmetic)
from tasks import imagenet16 as _imagenet16  # noqa: F401  (registers imagenet16)
from tasks import shapes as _shapes  # noqa: F401  (registers shapes)
from tasks.base import MODELS, TASKS, Split, StageData, Task, parse_block, register_model, register_task
from tasks.models import gpt as _gpt  # noqa: F401  (registers gpt)
from tasks.models import hf_gpt2 as _hf_gpt2  # noqa: F401  (registers hf_gpt2)
from tasks.models import mlp as _mlp  # noqa: F401  (registers mlp)
from tasks.models import occam as _occam  # noqa: F401  (registers occam_resnet18)
from tasks.models import plain_cnn as _plain_cnn  # noqa: F401  (registers plain_cnn)
from tasks.models import torchvision_arch as _torchvision_arch  # noqa: F401  (registers torchvision)
from tasks.models import vision as _vision  # noqa: F401  (registers resnet18, vit)

__all__ = ["MODELS", "TASKS", "Split", "StageData", "Task", "parse_block", "register_model", "register_task"]
