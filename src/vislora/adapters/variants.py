"""What AdaLoRA, MoLoRA and progressive rank growth need at the level of the whole model.

The training loop calls AdaptedModel.auxiliary_loss(), after_optimizer_step() and adapter_metrics() whatever the
method; these functions give them their content: AdaLoRA's orthogonality term and rank allocator, MoLoRA's
load-balancing loss and expert use, and the rank growth of a progressive schedule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from vislora.adapters import adalora
from vislora.adapters.growth import Grown, grow_layer_rank
from vislora.errors import AdapterError, ConfigError
from vislora.targets import resolve_targets

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer
    from vislora.model import AdaptedModel

def layers_of(model: AdaptedModel, name: str) -> dict[str, LoraLayer]:
    """The adapter layers that hold adapter `name`, by path."""
    return {path: layer for path, layer in model._layers.items() if name in layer.specs}


def is_training(model: AdaptedModel, name: str) -> bool:
    return any(p.requires_grad for p in model.adapter_parameters(name))


def auxiliary_loss(model: AdaptedModel) -> torch.Tensor | None:
    """Orthogonality of trainable AdaLoRA adapters plus the balance loss of MoLoRA gates used in the last forward."""
    terms = []
    for name, config in model.configs.items():
        if not is_training(model, name):
            continue
        layers = layers_of(model, name)
        if config.method == "adalora" and config.adalora.orth_reg_weight > 0:
            terms.append(config.adalora.orth_reg_weight * adalora.orthogonality(layers, name))
        if config.method == "molora" and config.molora.balance_weight > 0:
            balances = [layer.expert_stats[name].balance for layer in layers.values()
                        if name in layer.expert_stats and layer.expert_stats[name].balance is not None]
            for layer in layers.values():  # each forward's term is used once
                if name in layer.expert_stats:
                    layer.expert_stats[name].balance = None
            if balances:
                terms.append(config.molora.balance_weight * torch.stack(balances).mean())
    return torch.stack(terms).sum() if terms else None


def after_optimizer_step(model: AdaptedModel, step: int, total_steps: int) -> None:
    """Run the rank allocator of every AdaLoRA adapter that is being trained."""
    for name, allocator in model._allocators.items():
        if is_training(model, name):
            allocator.step(step, total_steps)


def metrics(model: AdaptedModel) -> dict[str, float]:
    """AdaLoRA's current rank budget per adapter; each MoLoRA expert's share of top-k slots, averaged over layers."""
    out: dict[str, float] = {}
    for name in model._allocators:
        ranks = adalora.kept_ranks(layers_of(model, name), name)
        out[f"adalora.{name}.rank_budget"] = float(sum(ranks.values()))
    shares: dict[str, list[float]] = defaultdict(list)
    for layer in model._layers.values():
        for key, value in layer.training_metrics().items():
            shares[key].append(value)
    out.update({key: sum(values) / len(values) for key, values in shares.items()})
    return out


def grow_rank(model: AdaptedModel, name: str, rank: int) -> list[Grown]:
    """Raise adapter `name` to rank `rank` everywhere, keeping every layer's scale and so the model's output."""
    config = model.configs[name]
    if config.rank_pattern:
        raise ConfigError(f"adapter {name!r} has a rank_pattern {config.rank_pattern}; progressive rank growth raises "
                          "one uniform rank, so remove the rank_pattern")
    if rank <= config.rank:
        raise ConfigError(f"rank growth of {name!r} must go up: it has rank {config.rank}, asked for {rank}")
    if model.merged:
        raise AdapterError(f"call unmerge() before growing the rank of {name!r}")
    ratio = math.sqrt(rank / config.rank) if config.use_rslora else rank / config.rank
    grown = [pair for layer in layers_of(model, name).values() for pair in grow_layer_rank(layer, name, rank)]
    model.configs[name] = config.model_copy(update={
        "rank": rank, "alpha": config.alpha * ratio,
        "alpha_pattern": {k: v * ratio for k, v in config.alpha_pattern.items()},
    })
    model.plans[name] = resolve_targets(model.base_model, model.configs[name])
    return grown
