"""Per-sample adapter routing: every sample of a batch computed with its own adapter, in one batched pass.

`AdaptedModel.forward(x, adapters=[...])` sets a Route on every adapter layer for the length of that call.
A layer stacks the pairs of the adapters the batch uses, rank-padded with zeros, with the scale (and a DoRA
adapter's row factor g) folded into B: A [K, R, in], B [K, out, R], slot 0 being the base model (a zero
pair). It gathers the stacks by each sample's slot and runs two batched matmuls,

    delta_n = B_k(n) (A_k(n) x_n)            plus (g_k(n) - 1) * W x_n for DoRA slots,

so the forward has no loop over adapters. Building the stacks visits each used adapter once; while no
gradient is recorded the stacks are cached until an adapter's tensors change. Plain LoRA pairs are stacked
as they are (their scales applied to the stack), so a batch that mixes adapters anew (a server's every batch)
costs two stacks per layer.
A Route is state on the layers for one forward: calls that route must not run concurrently on one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vislora.errors import AdapterError

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer
    from vislora.adapters.saved import ModulesToSave
    from vislora.model import AdaptedModel


@dataclass(frozen=True)
class Stacks:
    """One layer's adapters for a route, stacked by slot."""

    a: torch.Tensor  # (K, R, in)
    b: torch.Tensor  # (K, out, R), scale and DoRA factor folded in
    g: torch.Tensor | None  # (K, out) DoRA row factors (1 for other slots); None if no slot is DoRA
    dropout: torch.Tensor | None  # (K,) adapter dropout per slot; None if all are 0


@dataclass(frozen=True)
class Route:
    """Which adapter each sample of one batch uses."""

    names: tuple[str | None, ...]  # one entry per sample; None = the base model
    used: tuple[str | None, ...]  # slot k -> adapter; slot 0 is None
    index: torch.Tensor  # (N,) the slot of each sample

    @classmethod
    def build(cls, names: Sequence[str | None], device: torch.device | str) -> Route:
        used = (None, *dict.fromkeys(n for n in names if n is not None))
        slot = {name: k for k, name in enumerate(used)}
        index = torch.tensor([slot[n] for n in names], dtype=torch.long, device=device)
        return cls(tuple(names), used, index)

    @classmethod
    def for_call(cls, model: AdaptedModel, adapters: Sequence[str | None], args: tuple, kwargs: dict) -> Route:
        """The route of one `model(*args, adapters=..., **kwargs)` call, after checking `adapters` against it."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise AdapterError(f"adapters= takes one adapter name (or None) per sample, got {adapters!r}; "
                               "to use one adapter for the whole batch call set_active() instead")
        if model.merged:
            raise AdapterError(f"adapters {list(model.active_adapters)} are merged into the weights; call unmerge() "
                               "before routing samples to adapters")
        unknown = sorted({n for n in adapters if n is not None and n not in model.configs})
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown} in adapters=; loaded: {list(model.adapters) or 'none'}")
        experts = sorted({n for n in adapters if n is not None and model.configs[n].method == "molora"})
        if experts:
            raise AdapterError(f"MoLoRA adapter(s) {experts} cannot be routed per sample (their experts are chosen by "
                               "a gate per token); run them with set_active() on their own batches")
        batch = next((t for t in (*args, *kwargs.values()) if torch.is_tensor(t)), None)
        if batch is None:
            raise AdapterError("per-sample routing needs a tensor input whose first dimension is the batch")
        if len(adapters) != batch.shape[0]:
            raise AdapterError(f"adapters= has {len(adapters)} entries but the batch has {batch.shape[0]} samples "
                               f"(input shape {tuple(batch.shape)}); give one adapter name or None per sample")
        return cls.build(adapters, batch.device)

    # ------------------------------------------------------------ adapter layers
    def adapt(self, layer: LoraLayer, x: torch.Tensor, out: torch.Tensor, batch_dim: int) -> torch.Tensor:
        """out = W x + b plus each sample's own adapter delta; x (..., in) and out (..., out), batch on batch_dim."""
        x, out = x.movedim(batch_dim, 0), out.movedim(batch_dim, 0)
        n = self.index.shape[0]
        if x.shape[0] != n:
            raise AdapterError(
                f"per-sample routing got {n} adapter names, but layer {layer.path!r} sees a batch of {x.shape[0]} "
                f"(input shape {tuple(x.shape)}). Give one name per sample of the batch; routing needs each adapted "
                "layer to see the batch on its first dimension (models that fold the batch into tokens cannot route)"
            )
        stacks = stacks_for(layer, self.used)
        flat_x = x.reshape(n, -1, x.shape[-1]).to(stacks.a.dtype)  # (N, T, in)
        flat_out = out.reshape(n, -1, out.shape[-1])  # (N, T, out)
        adapted = flat_out
        if stacks.g is not None:  # DoRA: (g - 1) W x, per sample
            factor = stacks.g[self.index] - 1  # (N, out)
            adapted = adapted + (factor[:, None, :] * layer.without_bias(flat_out)).to(out.dtype)
        if layer.residual_owner is not None:  # PiSSA's W_res needs its residual except on its own samples
            keep = (self.index != self._slot(layer.residual_owner)).to(flat_out.dtype)  # (N,)
            adapted = adapted + keep[:, None, None] * layer.add_residual(flat_x, torch.zeros_like(flat_out))
        if layer.training and stacks.dropout is not None:
            flat_x = _dropout(flat_x, stacks.dropout[self.index])
        h = torch.bmm(flat_x, stacks.a[self.index].transpose(1, 2))  # (N, T, in) @ (N, in, R) -> (N, T, R)
        b = stacks.b[self.index].transpose(1, 2)  # (N, R, out)
        if adapted.dtype == h.dtype:
            adapted = torch.baddbmm(adapted, h, b)  # (N, T, out) + (N, T, R) @ (N, R, out)
        else:
            adapted = adapted + torch.bmm(h, b).to(adapted.dtype)
        return adapted.view(out.shape).movedim(0, batch_dim)

    def _slot(self, name: str) -> int:
        return self.used.index(name) if name in self.used else -1

    # ------------------------------------------------------------ modules trained in full (heads, norms)
    def run_saved(self, saved: ModulesToSave, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample through its adapter's copy of the module (the original for the others)."""
        modules = [saved.copies[n] if n is not None and n in saved.copies else saved.original_module
                   for n in self.used]
        x = x.movedim(saved.batch_dim, 0)
        if x.shape[0] != self.index.shape[0]:
            raise AdapterError(f"per-sample routing got {self.index.shape[0]} adapter names, but a module trained "
                               f"per adapter sees a batch of {x.shape[0]} (input shape {tuple(x.shape)})")
        if not args and not kwargs and all(type(m) is nn.Linear for m in modules):
            y = self._linear(modules, x)
        elif not args and not kwargs and _same_layer_norms(modules):
            y = self._layer_norm(modules, x)
        else:
            y = self._each_module(modules, x, *args, **kwargs)
        return y.movedim(0, saved.batch_dim)

    def _linear(self, modules: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        weight = torch.stack([m.weight for m in modules])[self.index]  # (N, out, in)
        y = torch.bmm(x.reshape(n, -1, x.shape[-1]), weight.transpose(1, 2))  # (N, T, in) @ (N, in, out)
        if modules[0].bias is not None:
            y = y + torch.stack([m.bias for m in modules])[self.index][:, None, :]  # (N, 1, out)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _layer_norm(self, modules: list[nn.LayerNorm], x: torch.Tensor) -> torch.Tensor:
        first = modules[0]
        y = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1 - len(first.normalized_shape)) + tuple(first.normalized_shape)
        if first.weight is not None:
            y = y * torch.stack([m.weight for m in modules])[self.index].view(shape)
        if first.bias is not None:
            y = y + torch.stack([m.bias for m in modules])[self.index].view(shape)
        return y

    def _each_module(self, modules: list[nn.Module], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Fallback for any other module: one call per used slot on its samples (batch on dim 0 in and out)."""
        parts = []
        for k in self.index.unique().tolist():
            rows = (self.index == k).nonzero().squeeze(1)
            parts.append((rows, modules[k](x.index_select(0, rows), *args, **kwargs)))
        first = parts[0][1]
        result = first.new_zeros((x.shape[0], *first.shape[1:]))
        for rows, y in parts:
            result = result.index_copy(0, rows, y)
        return result


def stacks_for(layer: LoraLayer, used: tuple[str | None, ...]) -> Stacks:
    """The layer's stacks for these slots; reused while no gradient is recorded and no tensor changed."""
    names = [n if n in layer.specs else None for n in used]
    if torch.is_grad_enabled():
        return _build_stacks(layer, names)
    key = (tuple(names), torch.is_inference_mode_enabled(), layer.base_weight._version,
           *(_versions(layer, n) for n in names if n))
    cached = layer._cache.get("route")
    if cached is not None and cached[0] == key:
        return cached[1]
    stacks = _build_stacks(layer, names)
    layer._cache["route"] = (key, stacks)
    return stacks


def _versions(layer: LoraLayer, name: str) -> tuple[int, ...]:
    """Version counters of adapter `name`'s tensors on `layer`: any in-place change (an optimizer step, a load,
    AdaLoRA's pruning) changes one."""
    # ParameterDict keeps its entries in _parameters; reading them there skips a getattr chain per tensor
    return tuple(store._parameters[name]._version if name in store._parameters else -1
                 for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.lora_E))


def _pair(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """(A [r, in], B [out, r], factor still to apply to B, DoRA's g [out] or None). A plain LoRA pair is the
    adapter's own tensors (its scale applied once to the whole stack): a server's every batch mixes adapters
    anew, and copying them into a folded form first would double the work."""
    spec = layer.specs[name]
    if spec.method == "lora" and not spec.slices:
        return layer.lora_A[name], layer.lora_B[name], spec.scale, None
    a, b = layer.folded_pair(name)  # (r, in), (out, r): scale, AdaLoRA's E and q/k/v slices folded in
    g = layer.dora_factor(name) if spec.method == "dora" else None
    return a, b if g is None else g[:, None] * b, 1.0, g


def _build_stacks(layer: LoraLayer, names: list[str | None]) -> Stacks:
    parts = [None if n is None else _pair(layer, n) for n in names]  # once per used adapter, not per sample
    pairs = [None if p is None else (p[0], p[1]) for p in parts]
    factors = [None if p is None else p[3] for p in parts]
    rank = max((p[0].shape[0] for p in pairs if p is not None), default=1)
    dtype = layer._adapter_dtype
    zero_a = torch.zeros(rank, layer.in_features, dtype=dtype, device=layer._device)
    zero_b = torch.zeros(layer.out_features, rank, dtype=dtype, device=layer._device)
    a = torch.stack([zero_a if p is None else p[0] if p[0].shape[0] == rank else
                     F.pad(p[0], (0, 0, 0, rank - p[0].shape[0])) for p in pairs])  # (K, R, in)
    b = torch.stack([zero_b if p is None else p[1] if p[1].shape[1] == rank else
                     F.pad(p[1], (0, rank - p[1].shape[1])) for p in pairs])  # (K, out, R)
    scales = [1.0 if p is None else p[2] for p in parts]
    if any(scale != 1.0 for scale in scales):
        b = b * torch.tensor(scales, dtype=dtype, device=layer._device)[:, None, None]
    g = None
    if any(f is not None for f in factors):
        ones = torch.ones(layer.out_features, dtype=dtype, device=layer._device)
        g = torch.stack([ones if f is None else f for f in factors])  # (K, out)
    rates = [layer.specs[n].dropout if n else 0.0 for n in names]
    dropout = torch.tensor(rates, dtype=dtype, device=layer._device) if any(rates) else None
    return Stacks(a, b, g, dropout)


def _dropout(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with a rate per sample: x (N, T, in), rate (N,)."""
    keep = (1 - rate)[:, None, None].expand_as(x)  # (N, T, in)
    return x * torch.bernoulli(keep) / keep


def _same_layer_norms(modules: list[nn.Module]) -> bool:
    first = modules[0]
    return all(type(m) is nn.LayerNorm for m in modules) and all(
        m.normalized_shape == first.normalized_shape and m.eps == first.eps
        and (m.weight is None) == (first.weight is None) and (m.bias is None) == (first.bias is None)
        for m in modules
    )
