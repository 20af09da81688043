"""AdamW with separate learning rates for adapter weights and the other trainable weights, warmup + cosine."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vislora.errors import ConfigError
from vislora.model import AdaptedModel
from vislora.run_config import OptimSection


def parameter_groups(model: AdaptedModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(adapter weights: the trainable tensors of the adapter layers, other trainable weights: heads, norms)."""
    in_layers = {id(p) for name in model.adapters for p in model.layer_parameters(name)}
    adapter, other = [], []
    for param in model.parameters():
        if param.requires_grad:
            (adapter if id(param) in in_layers else other).append(param)
    if not adapter and not other:
        raise ConfigError("the model has no trainable parameters; check adapter.targets and that an adapter is active")
    return adapter, other


def build_optimizer(model: AdaptedModel, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over two groups, always in this order: [adapter (lr_adapter), other (lr_head)]."""
    adapter, other = parameter_groups(model)
    return torch.optim.AdamW([
        {"params": adapter, "lr": optim.lr_adapter, "name": "adapter"},
        {"params": other, "lr": optim.lr_head, "name": "head"},
    ], weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection,
                    scale: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `max_steps` (or constant); times `scale(step)`
    when given (a training stage's lr_scale)."""
    warmup, total = optim.warmup_steps, optim.max_steps

    def shape(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        return shape(step) * (scale(step) if scale else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def position_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a freshly built scheduler where one that has already taken `step` steps would be (lrs included)."""
    scheduler.last_epoch = step
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = group["initial_lr"] * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
