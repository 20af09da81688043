"""Adapter layers: named adapters (LoRA, DoRA, ...: one module each) over one frozen base weight W [out, in].

A plain forward adds the terms of the active adapters to the base layer's output, out = W x + b:

    route set?  -> each sample with its own adapter (vislora.adapters.routing)
    otherwise   -> out += term(x) for each active adapter (a PiSSA residual first when its owner is inactive)

Merging writes the active adapters into W and empties the terms, so the forward then costs the base layer's alone:
W' = c (W + sum_D (g_D / c) dW_D) + sum_L dW_L with c = 1 + sum_D (g_D - 1), over DoRA adapters D (row factor g_D)
and the others L, plus a PiSSA residual whose owner is not merged: for one DoRA adapter W' = g (W + dW). Unmerging
takes exactly that out again with the recorded g_D.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from vislora.adapters.lora import BaseWeight, LoRA, MergePart
from vislora.adapters.routing import Route, Stacks, add_per_sample, build_stacks
from vislora.errors import AdapterError


class Term(Protocol):
    """Something a plain forward adds: an adapter, or a PiSSA residual."""

    def add(self, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor, base: BaseWeight) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeRecord:
    """What merge() wrote into W, so that unmerge() takes exactly that out again."""

    adapters: tuple[str, ...]
    residual: bool  # the PiSSA residual was added back (its owner was not merged)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # g [out] of each merged DoRA adapter


class LoraLayer(nn.Module):
    """Named adapters of one base weight [out_features, in_features]; subclasses say where W is and run the forward.

    `active` lists the adapters a plain forward adds; `route` (set by AdaptedModel for one call) replaces it with a
    per-sample choice; after merge() the forward is the base layer's alone.
    """

    is_vislora_wrapper = True  # targets.logical_modules looks through it to `base_layer`
    batch_dim = 0  # where this layer's input holds the batch (the tree sets 1 in sequence-first blocks)

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.adapters = nn.ModuleDict()
        self.terms: tuple[Term, ...] = ()  # what a plain forward adds, in order
        self._active: tuple[str, ...] = ()
        self.merge_record: MergeRecord | None = None
        self.route: Route | None = None
        self.path = ""  # set by AdaptedModel; names the layer in errors
        self.residual_owner: str | None = None  # the PiSSA adapter whose residual W lacks
        self._stacks: tuple[tuple, Stacks] | None = None
        self._stacks_route: Route | None = None  # the routed call the stacks were last checked for

    # ------------------------------------------------------------ the base layer (subclasses say which)
    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight W [out, in] that the adapters update."""
        raise NotImplementedError

    @property
    def base_bias(self) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype new adapters get: W's, but fp32 under a half-precision W (low-rank updates underflow there)."""
        dtype = self.base_weight.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    @property
    def device(self) -> torch.device:
        """Where W lives now (a model moved after injection takes its new adapters along)."""
        return self.base_weight.device

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """The adapters merged into W (none while unmerged)."""
        return self.merge_record.adapters if self.merge_record else ()

    @property
    def active(self) -> tuple[str, ...]:
        """The adapters a plain forward adds."""
        return self._active

    @active.setter
    def active(self, names: tuple[str, ...]) -> None:
        self._active = tuple(n for n in names if n in self.adapters)
        if self.merge_record is not None:  # W holds the merged adapters (and the residual) already
            self.terms = ()
            return
        owner = self.residual_owner
        residual = (self.adapters[owner].residual,) if owner is not None and owner not in self._active else ()
        self.terms = (*residual, *(self.adapters[n] for n in self._active))

    # ------------------------------------------------------------ adding and removing adapters
    def add_adapter(self, name: str, adapter: LoRA) -> None:
        """Give this layer adapter `name`: its tensors are created here, shaped for W, and initialised."""
        self._check_combination(name, adapter)
        adapter.build(self.in_features, self.out_features, self.adapter_dtype, self.device)
        adapter.start(self)
        self.adapters[name] = adapter
        if adapter.holds_residual:
            self.residual_owner = name
        self.active = self._active

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` and every tensor of it (a PiSSA residual goes back into W)."""
        if name == self.residual_owner:
            self.release()
        del self.adapters[name]
        self._stacks = None
        self.active = tuple(n for n in self._active if n != name)

    def release(self) -> None:
        """Give W back its PiSSA residual unless a merge already accounts for it."""
        if self.residual_owner is None:
            return
        if self.merge_record is None:
            self.adapters[self.residual_owner].release(self)
        self.residual_owner = None
        self.active = self._active

    def _check_combination(self, name: str, adapter: LoRA) -> None:
        if adapter.holds_residual and self.residual_owner is not None:
            raise AdapterError(f"{self.path}: adapter {self.residual_owner!r} already holds a PiSSA residual of this "
                               f"weight; {name!r} cannot start from it too. Use init='kaiming' for {name!r}.")
        if not (adapter.reads_base_weight or adapter.holds_residual):
            return  # the adapters here were checked as they came: a newcomer that neither reads nor rewrites W
            # cannot make a conflict (and a layer of 1,000 served adapters is not scanned again per load)
        everyone = (adapter, *self.adapters.values())
        readers = [a for a in everyone if a.reads_base_weight]
        writers = [a for a in everyone if a.holds_residual]
        if readers and writers:
            reader, writer = type(readers[0]).__name__, type(writers[0]).__name__
            raise AdapterError(f"{self.path}: {reader} and {writer} adapters cannot share a layer ({reader} reads W, "
                               f"which {writer} rewrites); put {name!r} on other targets or change its init/method")

    # ------------------------------------------------------------ forward
    def adapt(self, x: torch.Tensor, out: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
        """out = W x + b for input x, plus what the adapters add (merge empties the terms)."""
        if self.route is not None:
            return self.routed(x, out, batch_dim)
        base_out = out
        for term in self.terms:
            out = term.add(x, out, base_out, self)
        return out

    def routed(self, x: torch.Tensor, out: torch.Tensor, batch_dim: int) -> torch.Tensor:
        """out plus each sample's own adapter delta; x (..., in) and out (..., out), batch on batch_dim."""
        route = self.route
        x, out = x.movedim(batch_dim, 0), out.movedim(batch_dim, 0)
        index = route.index_for(x.shape[0], folded=x.dim() == 2)
        if index is None:
            raise AdapterError(
                f"per-sample routing got {route.index.shape[0]} adapter names, but layer {self.path!r} sees a batch "
                f"of {x.shape[0]} (input shape {tuple(x.shape)}). Give one name per sample of the batch; routing needs "
                "each adapted layer to see the batch on its first dimension (or, in a 2-D input, samples x tokens "
                "folded sample-major)"
            )
        n = index.shape[0]
        stacks = self.stacks(route.used, route)
        flat_x = x.reshape(n, -1, x.shape[-1]).to(stacks.a.dtype)  # (N, T, in)
        flat_out = out.reshape(n, -1, out.shape[-1])  # (N, T, out)
        adapted = flat_out
        if self.residual_owner is not None:  # PiSSA's W_res needs its residual except on its own samples
            keep = (index != route.slot(self.residual_owner)).to(flat_out.dtype)  # (N,)
            residual = self.adapters[self.residual_owner].residual.add(flat_x, torch.zeros_like(flat_out), flat_out,
                                                                       self)
            adapted = adapted + keep[:, None, None] * residual
        adapted = add_per_sample(stacks, index, flat_x, adapted, self.without_bias(flat_out), self.training)
        return adapted.view(out.shape).movedim(0, batch_dim)

    def stacks(self, used: tuple[str | None, ...], route: Route | None = None) -> Stacks:
        """The stacks of the adapters in these route slots; reused while no gradient is recorded and no tensor of
        them (nor W) changed. Within one routed call (`route`: a generate's every decode step) they are checked once:
        the tensors of K adapters are not re-read on each of its forwards."""
        adapters = [self.adapters[n] if n in self.adapters else None for n in used]  # noqa: SIM401 (ModuleDict)
        shape = (self.out_features, self.in_features)
        a = next((adapter.lora_A for adapter in adapters if adapter is not None), None)
        dtype, device = (self.adapter_dtype, self.device) if a is None else (a.dtype, a.device)
        if torch.is_grad_enabled():
            return build_stacks(adapters, self, shape, dtype, device)
        if route is not None and route is self._stacks_route and self._stacks is not None:
            return self._stacks[1]
        key = (tuple(n if n in self.adapters else None for n in used), torch.is_inference_mode_enabled(),
               self.base_weight._version, device, *(adapter.versions() for adapter in adapters if adapter is not None))
        if self._stacks is None or self._stacks[0] != key:
            self._stacks = (key, build_stacks(adapters, self, shape, dtype, device))
        self._stacks_route = route
        return self._stacks[1]

    def without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        """W x from W x + b."""
        return base_out if self.base_bias is None else base_out - self.base_bias

    # ------------------------------------------------------------ the adapters as matrices
    def delta_weight(self, name: str) -> torch.Tensor:
        """delta_W = scale * B @ A of adapter `name` as a dense [out, in] matrix (zero rows outside chosen blocks)."""
        return self.adapters[name].delta_weight(self)

    def change(self, name: str) -> torch.Tensor:
        """What adapter `name` does to the original W, dense [out, in] (DoRA: g (W + delta_W) - W)."""
        return self.adapters[name].change(self)

    def original_weight(self) -> torch.Tensor:
        """W as it was before any adapter: a PiSSA residual added back, nothing merged."""
        with torch.no_grad():
            return self.merged_weight(())

    # ------------------------------------------------------------ merge
    def check_merge(self, names: tuple[str, ...]) -> None:
        """Raise AdapterError if these adapters cannot be merged together into W."""
        for name in names:
            adapter = self.adapters[name]
            if adapter.merge_alone is not None and len(names) > 1:
                raise AdapterError(f"{self.path}: cannot merge {list(names)} together: {type(adapter).__name__} "
                                   f"adapter {name!r} {adapter.merge_alone}; merge it on its own")

    def merged_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        """W with `names` merged in, differentiable in the adapters' tensors (see the module docstring)."""
        weight = self.base_weight.to(self.adapter_dtype)  # (out, in)
        return self._merge_into([self.adapters[n].merge_part(self) for n in names], weight, self._adds_residual(names))

    def merge(self, names: tuple[str, ...]) -> None:
        """W := merged_weight(names); the forward then costs what the base layer costs."""
        self.check_merge(names)
        weight = self.base_weight
        with torch.no_grad():
            parts = {n: self.adapters[n].merge_part(self) for n in names}
            residual = self._adds_residual(names)
            merged = self._merge_into(list(parts.values()), weight.to(self.adapter_dtype), residual)
            factors = {n: part.g.detach().clone() for n, part in parts.items() if part.g is not None}
            weight.copy_(merged.to(weight.dtype))
        self.merge_record = MergeRecord(tuple(names), residual, factors)
        self.active = ()

    def unmerge(self) -> tuple[str, ...]:
        """Take out exactly what merge() put in (up to float rounding); returns the adapters that were merged."""
        record, weight = self.merge_record, self.base_weight
        if record is None:
            return ()
        with torch.no_grad():
            restored = weight.to(self.adapter_dtype)
            plain = [n for n in record.adapters if n not in record.factors]
            for name in plain:
                restored = restored - self.delta_weight(name)
            if record.residual:
                restored = restored - self.adapters[self.residual_owner].residual_delta()
            if record.factors:
                c = 1 + sum(g - 1 for g in record.factors.values())
                restored = restored / c[:, None]
                for name, g in record.factors.items():
                    restored = restored - (g / c)[:, None] * self.delta_weight(name)
            weight.copy_(restored.to(weight.dtype))
        self.merge_record = None
        self.active = self._active
        return record.adapters

    def _adds_residual(self, names: tuple[str, ...]) -> bool:
        return self.residual_owner is not None and self.residual_owner not in names

    def _merge_into(self, parts: list[MergePart], weight: torch.Tensor, residual: bool) -> torch.Tensor:
        """c (W + sum_D (g_D / c) dW_D) + sum_L dW_L (+ the PiSSA residual); see the module docstring."""
        scaled = [part for part in parts if part.g is not None]
        merged = weight
        if scaled:
            c = 1 + sum(part.g - 1 for part in scaled)  # (out,)
            for part in scaled:
                merged = merged + (part.g / c)[:, None] * part.delta
            merged = c[:, None] * merged
        for part in parts:
            if part.g is None:
                merged = merged + part.delta
        if residual:
            merged = merged + self.adapters[self.residual_owner].residual_delta()
        return merged


class LoraLinear(LoraLayer):
    """An nn.Linear with named adapters: forward = base + each active (unmerged) adapter."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer.in_features, base_layer.out_features, base_layer.weight)
        self.base_layer = base_layer

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, self.base_layer(x), self.batch_dim)
