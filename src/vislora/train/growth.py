"""Carry an optimizer across progressive rank growth: the grown parameters replace the old ones in their param
groups, and every state tensor shaped like the old parameter (AdamW's moments) is embedded into the new shape, the
new entries starting at zero, so the old entries train on exactly as before."""

from __future__ import annotations

import torch

from vislora.adapters.lora import Grown


def replace_grown(optimizer: torch.optim.Optimizer, grown: list[Grown]) -> None:
    """Swap each (old, new, (rank, dim)) of AdaptedModel.grow_rank into `optimizer`, state included."""
    new_of = {id(old): new for old, new, _ in grown}
    layout = {id(old): where for old, _, where in grown}
    for group in optimizer.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]
    for old, new, _ in grown:
        state = optimizer.state.pop(old, None)
        if state is None:
            continue
        rank, dim = layout[id(old)]
        optimizer.state[new] = {key: embed_grown(value, new.shape, rank, dim)
                                if torch.is_tensor(value) and value.shape == old.shape else value
                                for key, value in state.items()}


def embed_grown(old: torch.Tensor, new_shape: torch.Size, rank: int, dim: int) -> torch.Tensor:
    """Place a tensor shaped like an adapter's old A or B into its grown shape, zeros in the new entries.

    `dim` is the grown dimension (1 for A viewed as [P, r, in], -1 for B).
    """
    if dim == 1:  # A [P*r, in] -> [P*r', in], pair by pair
        pairs = old.shape[0] // rank
        grown = old.new_zeros(pairs, new_shape[0] // pairs, old.shape[1])
        grown[:, :rank] = old.view(pairs, rank, -1)
        return grown.flatten(0, 1)
    grown = old.new_zeros(new_shape)
    grown[..., :rank] = old
    return grown
