"""Mixture of LoRA experts: X low-rank experts per layer and a learned gate that mixes the top-k of them.

Per token (or per image, from the mean of its tokens) the gate scores the experts, g = x W_g^T [X]; the top-k are
mixed with softmax weights w over their scores: delta = scale * sum_e w_e B_e A_e x. All experts are computed as one
stacked low-rank product (A [X*r, in], B [X, out, r]); r is small, so the dense mixture is cheaper than dispatch.
The load-balancing loss is Switch Transformer's: X * sum_e f_e P_e, with f_e the share of top-k slots that went to
expert e and P_e its mean full-softmax probability, so the gate is pushed to use every expert.
The delta depends on the input through the gate: it cannot be merged into W nor combined with other adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vislora.config import MoLoraOptions

if TYPE_CHECKING:
    from vislora.adapters.linear import LoraLayer


@dataclass
class ExpertStats:
    """What the gate did since the stats were last read: top-k slots per expert, and the last balance loss."""

    slots: torch.Tensor | None = None  # (X,) float counts
    balance: torch.Tensor | None = None  # scalar with grad, from the last training forward


def add_experts(layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """out + scale * sum over the gate's top-k experts of w_e B_e A_e dropout(x); records the gate's choices."""
    spec, a = layer.specs[name], layer.lora_A[name]
    x = x.to(a.dtype)
    weights, logits = gate_weights(x, layer.lora_gate[name], spec.molora, batch_dim)  # (..., X) each
    h = layer.lora_dropout[name](x) @ a.T  # (..., in) @ (in, X*r) -> (..., X*r)
    delta = mixture(h, layer.lora_B[name], weights) * spec.scale  # (..., out)
    stats = layer.expert_stats.setdefault(name, ExpertStats())
    counts = slot_counts(weights.detach())
    stats.slots = counts if stats.slots is None else stats.slots + counts
    if layer.training and torch.is_grad_enabled():
        stats.balance = balance_loss(weights, logits)
    return out + delta.to(out.dtype)


def expert_shares(stats: dict[str, ExpertStats]) -> dict[str, float]:
    """Each expert's share of the top-k slots since the last call, per adapter; resets the counts."""
    out = {}
    for name, record in stats.items():
        if record.slots is not None and record.slots.sum() > 0:
            share = record.slots / record.slots.sum()
            out.update({f"molora.{name}.expert_{e}": float(v) for e, v in enumerate(share)})
            record.slots = None
    return out


def gate_weights(x: torch.Tensor, gate: torch.Tensor, options: MoLoraOptions, batch_dim: int) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """(mixing weights (..., X) with k non-zeros per row, gate logits (..., X)) for input x (..., in)."""
    logits = x @ gate.T  # (..., in) @ (in, X) -> (..., X)
    if options.gate == "image" and logits.dim() > 2:
        token_dims = [d for d in range(logits.dim() - 1) if d != batch_dim]
        logits = logits.mean(dim=token_dims, keepdim=True).expand_as(logits)  # one decision per image
    top, index = logits.topk(options.top_k, dim=-1)  # (..., k)
    weights = torch.zeros_like(logits).scatter(-1, index, top.softmax(dim=-1))  # (..., X)
    return weights, logits


def mixture(h: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e w_e B_e h_e for h (..., X*r) = the experts' A x, B [X, out, r], weights (..., X) -> (..., out)."""
    experts, out, rank = b.shape
    mixed = h.unflatten(-1, (experts, rank)) * weights[..., None]  # (..., X, r)
    return mixed.flatten(-2) @ b.permute(0, 2, 1).reshape(experts * rank, out)  # (..., X*r) @ (X*r, out)


def balance_loss(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """X * sum_e f_e P_e over all tokens: f from the top-k choices (no gradient), P from the full softmax."""
    experts = logits.shape[-1]
    chosen = (weights > 0).flatten(0, -2).float()  # (T, X)
    share = chosen.sum(0) / chosen.sum()  # (X,)
    probability = logits.flatten(0, -2).softmax(dim=-1).mean(0)  # (X,)
    return experts * (share * probability).sum()


def slot_counts(weights: torch.Tensor) -> torch.Tensor:
    """How many top-k slots each expert got in this forward: (X,)."""
    return (weights > 0).flatten(0, -2).sum(0).float()
