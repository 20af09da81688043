"""Modules trained in full per adapter (e.g. a classification head, or LayerNorms with train_norms).

A ModulesToSave keeps the original module and one trainable copy per adapter; its forward runs the active copy, or,
while a Route is set, each sample through its own adapter's copy: Linear heads and LayerNorms as one batched op over
stacked weights, any other module once per used copy on its samples.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vislora.adapters.routing import Route
from vislora.errors import AdapterError


class ModulesToSave(nn.Module):
    """Keeps the original module plus one trainable copy per adapter; forward runs the active copy."""

    is_vislora_wrapper = True

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.route: Route | None = None  # per-sample choice of copy for one forward (AdaptedModel sets it)
        self.batch_dim = 0  # where the input holds the batch (1 in sequence-first blocks)

    @property
    def base_layer(self) -> nn.Module:
        return self.original_module

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.copies[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def current(self) -> nn.Module:
        return self.copies[self.active] if self.active is not None else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.route is not None:
            return self.per_sample(self.route, *args, **kwargs)
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes of the wrapped module (e.g. head.in_features)
            if name in ("original_module", "copies", "active", "route", "batch_dim"):
                raise
            return getattr(self.current(), name)

    # ------------------------------------------------------------ per-sample routing
    def per_sample(self, route: Route, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample through its adapter's copy of the module (the original for the others)."""
        modules = [self.copies[n] if n is not None and n in self.copies else self.original_module for n in route.used]
        x = x.movedim(self.batch_dim, 0)
        index = route.index_for(x.shape[0])
        if index is None:
            raise AdapterError(f"per-sample routing got {route.index.shape[0]} adapter names, but a module trained "
                               f"per adapter sees a batch of {x.shape[0]} (input shape {tuple(x.shape)})")
        if not args and not kwargs and all(type(m) is nn.Linear for m in modules):
            y = _linear(modules, index, x)
        elif not args and not kwargs and _same_layer_norms(modules):
            y = _layer_norm(modules, index, x)
        else:
            y = _each_module(modules, index, x, *args, **kwargs)
        return y.movedim(0, self.batch_dim)


def _linear(modules: list[nn.Linear], index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    weight = torch.stack([m.weight for m in modules])[index]  # (N, out, in)
    y = torch.bmm(x.reshape(n, -1, x.shape[-1]), weight.transpose(1, 2))  # (N, T, in) @ (N, in, out)
    if modules[0].bias is not None:
        y = y + torch.stack([m.bias for m in modules])[index][:, None, :]  # (N, 1, out)
    return y.view(*x.shape[:-1], y.shape[-1])


def _layer_norm(modules: list[nn.LayerNorm], index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    first = modules[0]
    y = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1 - len(first.normalized_shape)) + tuple(first.normalized_shape)
    if first.weight is not None:
        y = y * torch.stack([m.weight for m in modules])[index].view(shape)
    if first.bias is not None:
        y = y + torch.stack([m.bias for m in modules])[index].view(shape)
    return y


def _each_module(modules: list[nn.Module], index: torch.Tensor, x: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
    """Fallback for any other module: one call per used slot on its samples (batch on dim 0 in and out)."""
    parts = []
    for k in index.unique().tolist():
        rows = (index == k).nonzero().squeeze(1)
        parts.append((rows, modules[k](x.index_select(0, rows), *args, **kwargs)))
    first = parts[0][1]
    result = first.new_zeros((x.shape[0], *first.shape[1:]))
    for rows, y in parts:
        result = result.index_copy(0, rows, y)
    return result


def _same_layer_norms(modules: list[nn.Module]) -> bool:
    first = modules[0]
    return all(type(m) is nn.LayerNorm for m in modules) and all(
        m.normalized_shape == first.normalized_shape and m.eps == first.eps
        and (m.weight is None) == (first.weight is None) and (m.bias is None) == (first.bias is None)
        for m in modules
    )
