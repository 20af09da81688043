"""Modules trained in full per adapter (e.g. a classification head, or LayerNorms with train_norms)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from vislora.adapters.routing import Route


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
            return self.route.run_saved(self, *args, **kwargs)
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes of the wrapped module (e.g. head.in_features)
            if name in ("original_module", "copies", "active", "route", "batch_dim"):
                raise
            return getattr(self.current(), name)
