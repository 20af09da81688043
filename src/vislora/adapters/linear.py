"""LoRA on nn.Linear, including one low-rank pair per chosen slice (q|k|v) of a fused qkv layer.

For a whole weight W [out, in]:   y = W x + b + scale * B (A dropout(x)),  A [r, in], B [out, r].
For slices of a fused W = [W_q; W_k; W_v] (each [d, in]) every chosen slice s gets its own pair
A_s [r, in], B_s [d, r]; they are stored stacked: A [S*r, in], B [S, d, r].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vislora.targets import QKV


@dataclass(frozen=True)
class PairSpec:
    """Shape and scaling of one named adapter on one weight."""

    rank: int
    scale: float
    dropout: float
    slices: tuple[int, ...] = ()  # indices into (q, k, v); () = the whole weight
    init: str = "kaiming"

    @property
    def n_pairs(self) -> int:
        return max(1, len(self.slices))


class LoraLayer(nn.Module):
    """Named low-rank updates of one base weight [out_features, in_features].

    `active` lists the adapters added in forward: the active adapters that are not merged into W.
    """

    is_vislora_wrapper = True  # targets.logical_modules looks through it to `base_layer`

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, PairSpec] = {}
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        # half-precision bases keep fp32 adapters: low-rank updates underflow in fp16/bf16
        self._adapter_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self._device = weight.device

    def add_adapter(self, name: str, spec: PairSpec) -> None:
        rows = self.out_features // len(QKV) if spec.slices else self.out_features
        kwargs = {"dtype": self._adapter_dtype, "device": self._device}
        a = torch.empty(spec.n_pairs * spec.rank, self.in_features, **kwargs)
        b = torch.zeros(*((spec.n_pairs,) if spec.slices else ()), rows, spec.rank, **kwargs)
        if spec.init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.rank)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT do
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec

    def delete_adapter(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.specs[name]
        self.active = tuple(n for n in self.active if n != name)

    def add_delta(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + scale * B A dropout(x), on the whole output or on the chosen q/k/v slices."""
        spec = self.specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(a.dtype)) @ a.T  # (..., in) @ (in, S*r) -> (..., S*r)
        if not spec.slices:
            return torch.add(out, (h @ b.T).to(out.dtype), alpha=spec.scale)  # (..., r) @ (r, out)
        h = h.unflatten(-1, (len(spec.slices), spec.rank))  # (..., S, r)
        delta = torch.einsum("...sr,sdr->...sd", h, b) * spec.scale  # (..., S, r) x (S, d, r) -> (..., S, d)
        blocks = out.unflatten(-1, (len(QKV), -1))  # (..., 3, d)
        index = torch.tensor(spec.slices, device=out.device)
        return blocks.index_add(-2, index, delta.to(out.dtype)).flatten(-2)

    def delta_weight(self, name: str) -> torch.Tensor:
        """delta_W = scale * B @ A as a dense [out, in] matrix (zero rows outside chosen slices)."""
        spec = self.specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        if not spec.slices:
            return (b @ a) * spec.scale  # (out, r) @ (r, in)
        per_slice = torch.einsum("sdr,sri->sdi", b, a.unflatten(0, (len(spec.slices), spec.rank)))
        full = a.new_zeros(len(QKV), self.out_features // len(QKV), self.in_features)
        full[list(spec.slices)] = per_slice * spec.scale  # (S, d, in) into (3, d, in)
        return full.flatten(0, 1)

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight W [out, in] that the adapters update."""
        raise NotImplementedError

    def merge(self, names: tuple[str, ...], safe: bool = True) -> None:
        """W += sum of delta_W over `names`; with `safe`, refuse a non-finite result and leave W intact."""
        weight = self.base_weight
        with torch.no_grad():
            delta = sum(self.delta_weight(n) for n in names).to(weight.dtype)
            if safe and not torch.isfinite(weight + delta).all():
                raise FloatingPointError(f"merging {names} would put NaN/Inf into the weight")
            weight += delta
        self.merged, self.active = self.merged + names, tuple(n for n in self.active if n not in names)

    def unmerge(self) -> tuple[str, ...]:
        """W -= the merged deltas; returns the adapters that were merged."""
        names, weight = self.merged, self.base_weight
        with torch.no_grad():
            for name in names:
                weight -= self.delta_weight(name).to(weight.dtype)
        self.merged = ()
        return names


class LoraLinear(LoraLayer):
    """An nn.Linear with named LoRA adapters: forward = base + each active (unmerged) adapter."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer.in_features, base_layer.out_features, base_layer.weight)
        self.base_layer = base_layer

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.active:
            out = self.add_delta(name, x, out)
        return out
