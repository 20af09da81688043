"""Progressive rank growth of one adapter layer: more rank, same output, optimizer state that can follow."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from vislora.errors import AdapterError

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer

Grown = tuple[nn.Parameter, nn.Parameter, tuple[int, int]]


def grow_layer_rank(layer: LoraLayer, name: str, rank: int) -> list[Grown]:
    """Give adapter `name` rank `rank` > its rank without changing the layer's output: new rows of A drawn like a
    fresh adapter's, new columns of B zero, the scale kept. Returns (old, new, (rank, grown_dim)) for A and B, so an
    optimizer can carry the old entries' state over (see `embed_grown`)."""
    spec = layer.specs[name]
    if spec.method not in ("lora", "dora") or name == layer.residual_owner:
        raise AdapterError(f"{layer.path}: adapter {name!r} ({spec.method}, init {spec.init}) cannot grow its "
                           "rank; progressive rank growth works on LoRA and DoRA adapters not initialised by PiSSA")
    extra = rank - spec.rank
    old_a, old_b = layer.lora_A[name], layer.lora_B[name]
    fresh = torch.empty(spec.n_pairs * extra, layer.in_features, dtype=old_a.dtype, device=old_a.device)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    with torch.no_grad():
        a = torch.cat([old_a.view(spec.n_pairs, spec.rank, -1), fresh.view(spec.n_pairs, extra, -1)], dim=1)
        b = torch.cat([old_b, old_b.new_zeros(*old_b.shape[:-1], extra)], dim=-1)  # (..., r + extra)
    layer.lora_A[name] = nn.Parameter(a.flatten(0, 1), requires_grad=old_a.requires_grad)
    layer.lora_B[name] = nn.Parameter(b, requires_grad=old_b.requires_grad)
    layer.specs[name] = replace(spec, rank=rank)
    layer._cache.clear()
    return [(old_a, layer.lora_A[name], (spec.rank, 1)), (old_b, layer.lora_B[name], (spec.rank, -1))]


def embed_grown(old: torch.Tensor, new_shape: torch.Size, rank: int, dim: int) -> torch.Tensor:
    """Place a tensor shaped like an adapter's old A or B into its grown shape, zeros in the new entries.

    `dim` is the grown dimension (1 for A viewed as [P, r, in], -1 for B); used to carry optimizer state over.
    """
    if dim == 1:  # A [P*r, in] -> [P*r', in], pair by pair
        pairs = old.shape[0] // rank
        grown = old.new_zeros(pairs, new_shape[0] // pairs, old.shape[1])
        grown[:, :rank] = old.view(pairs, rank, -1)
        return grown.flatten(0, 1)
    grown = old.new_zeros(new_shape)
    grown[..., :rank] = old
    return grown
