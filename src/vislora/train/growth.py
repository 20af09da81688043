"""Carry an optimizer across progressive rank growth: the grown parameters replace the old ones in their param
groups, and every state tensor shaped like the old parameter (AdamW's moments) is embedded into the new shape, the
new entries starting at zero, so the old entries train on exactly as before."""

from __future__ import annotations

import torch

from vislora.adapters.growth import Grown, embed_grown


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
