"""Per-sample routing: every sample of a batch computed with its own adapter, in one batched pass.

`AdaptedModel.forward(x, adapters=[...])` puts a Route on every adapter layer for the length of that call. A layer
stacks the pairs of the adapters the batch uses, rank-padded with zeros, with the scale (and a DoRA adapter's row
factor g) folded into B: A [K, R, in], B [K, out, R], slot 0 being the base model (a zero pair). It gathers the
stacks by each sample's slot and runs two batched matmuls,

    delta_n = B_k(n) (A_k(n) x_n)            plus (g_k(n) - 1) * W x_n for DoRA slots,

so the forward has no loop over adapters. Building the stacks visits each used adapter once; while no gradient is
recorded the layer keeps them until an adapter's tensors change. Whole-weight LoRA pairs are stacked as they are
(their scales applied to the stack), so a batch that mixes adapters anew (a server's every batch) costs two stacks
per layer. A Route is state on the layers for one forward: calls that route must not run concurrently on one model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vislora.adapters.lora import BaseWeight, LoRA
from vislora.errors import AdapterError


@dataclass(frozen=True)
class Route:
    """Which adapter each sample of one batch uses."""

    names: tuple[str | None, ...]  # one entry per sample; None = the base model
    used: tuple[str | None, ...]  # slot k -> adapter; slot 0 is None
    index: torch.Tensor  # (N,) the slot of each sample
    repeat: int = 1  # every sample appears `repeat` times in a row (generate's beams); a layer may see it once

    @classmethod
    def for_call(cls, adapters: Sequence[str | None], inputs: Sequence[Any], loaded: Mapping[str, type[LoRA]],
                 merged: tuple[str, ...] | None) -> Route:
        """The route of one `model(*inputs, adapters=...)` call, after checking `adapters` against the model's
        `loaded` adapters (name -> method class) and what is `merged` into its weights (None: nothing)."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise AdapterError(f"adapters= takes one adapter name (or None) per sample, got {adapters!r}; "
                               "to use one adapter for the whole batch call set_active() instead")
        if merged is not None:
            raise AdapterError(f"adapters {list(merged)} are merged into the weights; call unmerge() before routing "
                               "samples to adapters")
        unknown = sorted({n for n in adapters if n is not None and n not in loaded})
        if unknown:
            raise AdapterError(f"unknown adapter(s) {unknown} in adapters=; loaded: {list(loaded) or 'none'}")
        refusing = [n for n in dict.fromkeys(adapters) if n is not None and loaded[n].refusal]
        if refusing:
            method = loaded[refusing[0]]
            raise AdapterError(f"{method.__name__} adapter(s) {refusing} cannot be routed per sample: each is "
                               f"{method.refusal}; run them with set_active() on their own batches")
        batch = next((t for t in inputs if torch.is_tensor(t)), None)
        if batch is None:
            raise AdapterError("per-sample routing needs a tensor input whose first dimension is the batch")
        if len(adapters) != batch.shape[0]:
            raise AdapterError(f"adapters= has {len(adapters)} entries but the batch has {batch.shape[0]} samples "
                               f"(input shape {tuple(batch.shape)}); give one adapter name or None per sample")
        return cls.build(adapters, batch.device)

    @classmethod
    def build(cls, names: Sequence[str | None], device: torch.device | str) -> Route:
        used = (None, *dict.fromkeys(n for n in names if n is not None))
        slot = {name: k for k, name in enumerate(used)}
        index = torch.tensor([slot[n] for n in names], dtype=torch.long, device=device)
        return cls(tuple(names), used, index)

    def repeated(self, repeat: int) -> Route:
        """This route with every sample `repeat` times in a row (beam search's copies of a prompt)."""
        return Route(tuple(n for n in self.names for _ in range(repeat)), self.used,
                     self.index.repeat_interleave(repeat), self.repeat * repeat)

    def index_for(self, batch: int, folded: bool = False) -> torch.Tensor | None:
        """The slots of a batch of `batch` samples: every sample's, or once per repeated sample (generate runs the
        image tower on each prompt's image once, the language model on every beam); None if neither fits.

        `folded`: the layer's input is 2-D, (samples x tokens, features), as from a model that flattens its tokens
        before a layer (OPT's MLP, BLIP-2's LM); a multiple of the samples is then read sample-major (every sample's
        tokens in a row, what `reshape(-1, features)` of (samples, tokens, features) gives) and every sample's slot
        returned, the caller viewing its input as (samples, tokens, features)."""
        samples = self.index.shape[0]
        if batch == samples or (folded and batch % samples == 0):
            return self.index
        if self.repeat > 1 and batch * self.repeat == samples:
            return self.index[::self.repeat]
        return None

    def slot(self, name: str) -> int:
        """The slot of adapter `name`, -1 if no sample uses it."""
        return self.used.index(name) if name in self.used else -1


@dataclass(frozen=True)
class Stacks:
    """One layer's adapters for a route, stacked by slot."""

    a: torch.Tensor  # (K, R, in)
    b: torch.Tensor  # (K, out, R), scale and DoRA factor folded in
    g: torch.Tensor | None  # (K, out) DoRA row factors (1 for other slots); None if no slot is DoRA
    dropout: torch.Tensor | None  # (K,) adapter dropout per slot; None if all are 0


def build_stacks(adapters: list[LoRA | None], base: BaseWeight, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device) -> Stacks:
    """The stacks of `adapters` by slot (None = a zero pair) for a weight of `shape` (out, in)."""
    out_features, in_features = shape
    parts = [None if adapter is None else adapter.routed_pair(base) for adapter in adapters]  # once per adapter
    rank = max((p[0].shape[0] for p in parts if p is not None), default=1)
    zero_a = torch.zeros(rank, in_features, dtype=dtype, device=device)
    zero_b = torch.zeros(out_features, rank, dtype=dtype, device=device)
    a = torch.stack([zero_a if p is None else p[0] if p[0].shape[0] == rank else
                     F.pad(p[0], (0, 0, 0, rank - p[0].shape[0])) for p in parts])  # (K, R, in)
    b = torch.stack([zero_b if p is None else p[1] if p[1].shape[1] == rank else
                     F.pad(p[1], (0, rank - p[1].shape[1])) for p in parts])  # (K, out, R)
    scales = [1.0 if p is None else p[2] for p in parts]
    if any(scale != 1.0 for scale in scales):
        b = b * torch.tensor(scales, dtype=dtype, device=device)[:, None, None]
    g = None
    if any(p is not None and p[3] is not None for p in parts):
        ones = torch.ones(out_features, dtype=dtype, device=device)
        g = torch.stack([ones if p is None or p[3] is None else p[3] for p in parts])  # (K, out)
    rates = [0.0 if adapter is None else adapter.dropout_rate for adapter in adapters]
    dropout = torch.tensor(rates, dtype=dtype, device=device) if any(rates) else None
    return Stacks(a, b, g, dropout)


def add_per_sample(stacks: Stacks, index: torch.Tensor, x: torch.Tensor, out: torch.Tensor, plain: torch.Tensor,
                   training: bool) -> torch.Tensor:
    """out plus each sample's delta: x (N, T, in), out and plain = W x (N, T, out), index (N,) -> (N, T, out)."""
    if stacks.g is not None:  # DoRA: (g - 1) W x, per sample
        factor = stacks.g[index] - 1  # (N, out)
        out = out + (factor[:, None, :] * plain).to(out.dtype)
    if training and stacks.dropout is not None:
        keep = (1 - stacks.dropout[index])[:, None, None].expand_as(x)  # (N, T, in): inverted dropout per sample
        x = x * torch.bernoulli(keep) / keep
    h = torch.bmm(x, stacks.a[index].transpose(1, 2))  # (N, T, in) @ (N, in, R) -> (N, T, R)
    b = stacks.b[index].transpose(1, 2)  # (N, R, out)
    if out.dtype == h.dtype:
        return torch.baddbmm(out, h, b)  # (N, T, out) + (N, T, R) @ (N, R, out)
    return out + torch.bmm(h, b).to(out.dtype)
