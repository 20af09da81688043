"""Adapters on a weight that is a bare nn.Parameter of some module (open_clip's `Attention.in_proj_weight`, any user
module), through `torch.nn.utils.parametrize`.

The owner module keeps running its own forward; reading `owner.<name>` now gives

    W + sum_i (g_i - 1) W + sum_i g_i dW_i       (the active adapters, as merging would write them)

so training, merge, unmerge and saving work as on an nn.Linear. Dropout on the adapter branch cannot be expressed
in a weight, and MoLoRA's gate needs the input, so both are refused here. Per-sample routing: while a Route is set
the weight reads as a `RoutedWeight`, a tensor whose `F.linear(x, W, b)` adds each sample's adapter to x W^T exactly
as an nn.Linear layer does; any other use of the weight while routing is refused rather than silently unrouted.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from vislora.adapters.layer import LoraLayer
from vislora.adapters.lora import LoRA
from vislora.errors import AdapterError


class LoraParameter(LoraLayer):
    """The parametrization of one raw weight W [out, in] of `owner`: W plus the active adapters."""

    def __init__(self, owner: nn.Module, name: str) -> None:
        weight = getattr(owner, name)
        super().__init__(weight.shape[1], weight.shape[0], weight)
        self.name = name
        self._weight = (weight,)  # a tuple, so that the owner's parameter is not registered a second time here

    @classmethod
    def attach(cls, owner: nn.Module, name: str) -> LoraParameter:
        """Parametrize `owner.<name>` with a new LoraParameter and return it."""
        layer = cls(owner, name)
        parametrize.register_parametrization(owner, name, layer)
        layer._weight = (owner.parametrizations[name].original,)
        return layer

    def detach_from(self, owner: nn.Module) -> None:
        """Take the parametrization off again: `owner.<name>` is the raw parameter, holding what W holds now."""
        parametrize.remove_parametrizations(owner, self.name, leave_parametrized=False)

    @property
    def base_weight(self) -> torch.Tensor:
        return self._weight[0]

    @property
    def base_bias(self) -> torch.Tensor | None:
        return None  # the layer knows W only; a routed F.linear adds the bias after the adapters

    def add_adapter(self, name: str, adapter: LoRA) -> None:
        if adapter.refusal is not None:
            raise AdapterError(f"{self.path}: adapter {name!r} cannot sit on a raw parameter: it is {adapter.refusal}")
        if adapter.dropout_rate > 0:
            raise AdapterError(f"{self.path}: adapter dropout acts on a layer's input, but {self.path!r} is a raw "
                               f"weight the module reads directly; set dropout: 0 for {name!r} (or target a Linear)")
        super().add_adapter(name, adapter)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """What `owner.<name>` reads: W, W with the active adapters, or W routed per sample."""
        if self.route is not None:
            return RoutedWeight(weight, self)
        if not self.terms:
            return weight
        return self.merged_weight(self.active).to(weight.dtype)

    def routed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, W, b) with each sample's adapter added, as an nn.Linear adapter layer computes it."""
        with torch._C.DisableTorchFunctionSubclass():
            plain = F.linear(x, weight)  # (..., out)
        out = self.routed(x, plain, self.batch_dim)
        return out if bias is None else out + bias


class RoutedWeight(torch.Tensor):
    """A raw weight read while a Route is set: `F.linear` on it routes each sample through its own adapter."""

    layer: LoraParameter
    # what may be read of the weight without using its values: metadata, never the numbers
    _METADATA: ClassVar[frozenset[str]] = frozenset({"shape", "dtype", "device", "requires_grad", "ndim", "layout",
                                                     "is_cuda", "is_sparse", "is_quantized", "is_meta", "grad_fn"})
    _QUERIES: ClassVar[frozenset[str]] = frozenset({"size", "dim", "__format__", "__repr__"})

    @staticmethod
    def __new__(cls, weight: torch.Tensor, layer: LoraParameter) -> RoutedWeight:
        routed = weight.as_subclass(cls)  # same storage, still in the autograd graph
        routed.layer = layer
        return routed

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            return weight.layer.routed_linear(x, weight, bias)
        name = getattr(func, "__name__", "")
        if name in cls._QUERIES or (name == "__get__" and getattr(func.__self__, "__name__", "") in cls._METADATA):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        layer = next(a.layer for a in (*args, *kwargs.values()) if isinstance(a, RoutedWeight))
        used = getattr(func.__self__, "__name__", name) if name == "__get__" else name
        raise AdapterError(f"{layer.path}: the module uses its raw weight in {used!r}, "
                           "not through F.linear, so its samples cannot be routed to different adapters; run them "
                           "with set_active() on their own batches")
