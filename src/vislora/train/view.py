"""What the parts of training see of the running trainer: the `TrainerView` protocol, which Trainer satisfies.

Callbacks (the gradient monitor among them) and tasks are handed the trainer and read it through this protocol,
not through the Trainer class, so they sit below the trainer module that imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from vislora.data.datasets import ImageDataset
from vislora.model import AdaptedModel
from vislora.run_config import TrainConfig
from vislora.train.checkpoint import LoopState


class TrainerView(Protocol):
    """The trainer's state that callbacks and tasks may read: config, Accelerate, the model, the loop position."""

    config: TrainConfig
    accelerator: Accelerator
    model: nn.Module  # as Accelerate prepared it (wrapped for data parallelism); `adapted` is the AdaptedModel
    optimizer: torch.optim.Optimizer
    loop: LoopState
    run_dir: Path
    train_data: ImageDataset
    val_data: ImageDataset | None
    eval_transform: Callable[[Image.Image, int], Any]  # the evaluation transform of val_data

    @property
    def adapted(self) -> AdaptedModel: ...
